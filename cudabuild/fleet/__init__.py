"""Fleets: an OCI registry as the shared cache, and kernel x driver matrices."""
