#!/bin/sh
# Runs inside the builder container, with no privileges and no network: Debian's userspace driver
# packages (USERSPACE_DEBS) unpacked and flattened into $WORK/userspace once per set of packages;
# the host keeps the tree in its cache and links it into each build of that driver.
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/driver-$DRIVER_SOURCE.sh"

WORK=${WORK:-/cudabuild/work}
OUT="$WORK"
step "unpack userspace driver"
collect_userspace
step "done"
