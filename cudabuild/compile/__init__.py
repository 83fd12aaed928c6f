"""Building modules (phase 1): the plan, the steps and the builder container, publishing, the
modules a command names (intake), and the backends that run a build elsewhere. The cache and
downloads (store/), the engine and the registry are below it."""
