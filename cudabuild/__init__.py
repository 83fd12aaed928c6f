"""cudabuild: precompiled, verified NVIDIA kernel modules baked into GPU container images."""

__version__ = "0.1.0"
