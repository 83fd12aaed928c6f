"""Putting a driver on a host, and taking it off: install, upgrade (drain, roll back), uninstall, and
what an install left (the record of its files)."""
