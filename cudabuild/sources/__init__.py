"""Where kernels and drivers come from: Debian packages, git tags, NVIDIA installers. Each returns a frozen plan."""
