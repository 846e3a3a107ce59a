"""gpu-dra: Kubernetes DRA node driver for NVIDIA GPUs (driver name gpu.nvidia.com)."""
