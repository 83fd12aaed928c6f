# Helpers for the builder scripts. Step markers on stdout become named steps on the host.
step() { echo "::cudabuild-step::$1"; }
die() { echo "error: $*" >&2; exit 1; }
