"""Fleets: kernel x driver matrices built locally, as Swarm jobs or as Kubernetes Jobs, with an OCI
registry as the shared cache; and cudabuild's own tool image, which the nodes run."""
