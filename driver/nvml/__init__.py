"""The driver's narrow NVML interface.

``backend.Nvml`` is the only code that talks to a pynvml-like module (nvidia-ml-py, or the
file-backed fake in ``fakepynvml``); everything else sees the frozen values in ``types``.
"""

from driver.nvml.backend import Nvml
from driver.nvml.types import GpuInfo, SystemInfo

__all__ = ["GpuInfo", "Nvml", "SystemInfo"]
