#!/bin/sh
# Runs inside the builder container, with no privileges and no network: one of Debian's driver
# packages' parts unpacked, once per set of packages; the host keeps the tree in its cache and
# every build of that driver, for any kernel, takes it from there instead of decompressing again.
# DRIVER_DEB set: the module source's tarball, unpacked into $WORK/source (a build copies it)
# USERSPACE_DEBS set: the userspace packages, flattened into $WORK/userspace (linked into results)
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/driver-$DRIVER_SOURCE.sh"

WORK=${WORK:-/cudabuild/work}
OUT="$WORK"
if [ -n "$DRIVER_DEB" ]; then
    unpack_source "$WORK/source"
fi
if [ -n "$USERSPACE_DEBS" ]; then
    step "unpack userspace driver"
    collect_userspace
fi
step "done"
