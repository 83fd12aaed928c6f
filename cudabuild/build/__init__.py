"""Building modules: the engine, the builder container, the cache, downloads, and phase 1 as a whole."""
