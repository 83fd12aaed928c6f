"""Building modules (phase 1): the builder image and container, the plan and the build, publishing,
and the backends that run a build elsewhere. The cache, downloads and the engine are below it:
cudabuild/store/cache.py, fetch.py and engine.py."""
