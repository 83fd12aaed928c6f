#!/bin/sh
# Runs in a builder container with network, unprivileged: fetch one tag of a kernel repository into
# KERNEL_CLONE, an empty directory the host publishes into the cache when this succeeds.
# Sparse (default): a partial clone (--filter=blob:none) of the tag with a sparse checkout of what
# olddefconfig, modules_prepare and external module builds read (FACTS.md: 7x fewer bytes, same
# modules). Servers without filter support send every blob of the tag instead, and git says so.
# In: KERNEL_REPO, KERNEL_TAG, KERNEL_COMMIT (what the tag named when the host asked), KERNEL_CLONE,
#     KERNEL_CHECKOUT (sparse|full)
set -eu
. "$(dirname "$0")/lib.sh"

export GIT_TERMINAL_PROMPT=0 HOME=/tmp
step "fetch kernel source ($KERNEL_CHECKOUT clone of $KERNEL_TAG)"
if [ "$KERNEL_CHECKOUT" = sparse ]; then
    git clone --depth 1 --filter=blob:none --no-checkout --branch "$KERNEL_TAG" "$KERNEL_REPO" "$KERNEL_CLONE" 2>&1
    git -C "$KERNEL_CLONE" sparse-checkout set --no-cone '/*' '!/*/' '/include/' '/scripts/' '/arch/x86/' '/tools/' \
        '/security/selinux/include/' '/kernel/bounds.c' '/kernel/time/timeconst.bc' '/lib/vdso/' '/certs/' \
        '/usr/' 'Kconfig*' 'Kbuild*' 'Makefile*' '*.lds*'
    git -C "$KERNEL_CLONE" checkout -q "$KERNEL_TAG" 2>&1
else
    git clone --depth 1 --branch "$KERNEL_TAG" "$KERNEL_REPO" "$KERNEL_CLONE" 2>&1
fi
got=$(git -C "$KERNEL_CLONE" rev-parse HEAD)
[ "$got" = "$KERNEL_COMMIT" ] || die "the tag $KERNEL_TAG moved while it was fetched (it named $KERNEL_COMMIT, the clone has $got); run again"
echo "fetched $got: $(du -sb "$KERNEL_CLONE/.git/objects" | cut -f1) bytes of objects, $(du -sb --exclude=.git "$KERNEL_CLONE" | cut -f1) bytes checked out"
step "done"
