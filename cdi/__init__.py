"""CDI (Container Device Interface) specs: model, names, atomic store, edit builders.

No NVML, no Kubernetes: the lowest layer, which every other package may import.
"""
