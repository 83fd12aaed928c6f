#!/bin/sh
# Runs inside the builder container, with no privileges, no capabilities and no network.
# /cudabuild/builder    these scripts (read-only)
# /cudabuild/inputs     downloaded packages, by content (read-only)
# /cudabuild/kernels    unpacked and prepared kernel trees, shared between builds (read-only)
# /cudabuild/installer  an NVIDIA installer, checked and extracted on the host (read-only; run source)
# /cudabuild/work       this build's scratch space; the result goes to $WORK/out
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/kernel-$KERNEL_SOURCE.sh"
. "$here/driver-$DRIVER_SOURCE.sh"

WORK=${WORK:-/cudabuild/work}
OUT="$WORK/out"
mkdir -p "$OUT/modules"

# The kernel trees are shared by every build: this step must not be able to change them.
if touch /cudabuild/kernels/.cudabuild-write-probe 2>/dev/null; then
    rm -f /cudabuild/kernels/.cudabuild-write-probe
    die "the kernel trees are writable in the build step; refusing to build"
fi
echo "builder: uid $(id -u), capabilities $(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status), kernel trees read-only"

kernel_paths
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
