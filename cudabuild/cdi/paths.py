"""CDI's fixed facts, written once: where engines read specs (under a root; the second wins a name
clash) and the options a library is mounted with. Apart from cdi.py so that the OCI runtime's
quick path imports nothing more than this."""

SPEC_DIRS = ("etc/cdi", "var/run/cdi")
MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "bind")
