"""Getting a built driver to containers: runtime images."""
