"""One host as a chroot sees it: its root (no link followed), the driver's layout there, device nodes,
kernels and boot entries, what holds the GPU, and the loader."""
