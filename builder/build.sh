#!/bin/sh
# Runs inside the builder container, with no privileges and no network.
# /cudabuild/builder  these scripts (read-only)
# /cudabuild/inputs   downloaded packages, by content (read-only)
# /cudabuild/kernels  unpacked, cloned and prepared kernel trees, shared between builds
# /cudabuild/work     this build's scratch space; the result goes to $WORK/out
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/kernel-$KERNEL_SOURCE.sh"
. "$here/driver-$DRIVER_SOURCE.sh"

WORK=${WORK:-/cudabuild/work}
OUT="$WORK/out"
mkdir -p "$OUT/modules"

prepare_kernel
extract_driver

build_driver

step "strip debug info"
for name in $MODULES; do
    ko="$DRIVER_DIR/$name.ko"
    [ -f "$ko" ] || die "make finished but $name.ko was not built (expected in $DRIVER_DIR)"
    strip --strip-debug -o "$OUT/modules/$name.ko" "$ko"
done

collect_userspace
step "done"
