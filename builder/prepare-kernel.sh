#!/bin/sh
# Runs in a builder container with no network, unprivileged: make the kernel tree that module
# builds read (Debian headers unpacked, or a git tag prepared out of tree) in an empty directory the
# host publishes into the cache when this succeeds. The only step that writes a kernel tree.
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/kernel-$KERNEL_SOURCE.sh"
prepare_kernel
step "done"
