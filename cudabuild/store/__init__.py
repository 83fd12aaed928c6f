"""Content-addressed storage every layer uses: the cache (entries, locks, space) and downloads."""
