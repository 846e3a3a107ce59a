"""gpu-dra: Kubernetes DRA node driver for NVIDIA GPUs (driver name gpu.nvidia.com)."""


def version() -> str:
    """The installed distribution's version (``0.1.0``); ``0+unknown`` when run from a bare tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gpu-dra")
    except PackageNotFoundError:
        return "0+unknown"
