"""Images baked from a build: runtime images (one layer over any base) and the driver image."""
