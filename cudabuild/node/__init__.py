"""A node across kernel updates: the driver container's service, staging the next kernel's build, and the
ready gate."""
