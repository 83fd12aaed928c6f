"""The CDI spec, the one description of a host's GPUs and driver, and what reads it: `cudabuild run` and
the OCI runtime."""
