"""GPU sharing: the opaque config API, time-slicing and MPS. Never imports driver."""
