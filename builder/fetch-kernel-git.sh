#!/bin/sh
# Runs in a builder container with network: fetch one tag of a kernel repository into the cache.
# Sparse (default): a partial clone (--filter=blob:none) of the tag with a sparse checkout of what
# olddefconfig, modules_prepare and external module builds read (FACTS.md: 7x fewer bytes, same
# modules). Servers without filter support send every blob of the tag instead, and git says so.
# In: KERNEL_REPO, KERNEL_TAG, KERNEL_CLONE (destination), KERNEL_CHECKOUT (sparse|full)
set -eu
. "$(dirname "$0")/lib.sh"

export GIT_TERMINAL_PROMPT=0 HOME=/tmp
staging="$KERNEL_CLONE.partial.$$"
rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT  # a failed clone leaves nothing in the cache
step "fetch kernel source ($KERNEL_CHECKOUT clone of $KERNEL_TAG)"
if [ "$KERNEL_CHECKOUT" = sparse ]; then
    git clone --depth 1 --filter=blob:none --no-checkout --branch "$KERNEL_TAG" "$KERNEL_REPO" "$staging" 2>&1
    git -C "$staging" sparse-checkout set --no-cone '/*' '!/*/' '/include/' '/scripts/' '/arch/x86/' '/tools/' \
        '/security/selinux/include/' '/kernel/bounds.c' '/kernel/time/timeconst.bc' '/lib/vdso/' '/certs/' \
        '/usr/' 'Kconfig*' 'Kbuild*' 'Makefile*' '*.lds*'
    git -C "$staging" checkout -q "$KERNEL_TAG" 2>&1
else
    git clone --depth 1 --branch "$KERNEL_TAG" "$KERNEL_REPO" "$staging" 2>&1
fi
echo "fetched: $(du -sb "$staging/.git/objects" | cut -f1) bytes of objects, $(du -sb --exclude=.git "$staging" | cut -f1) bytes checked out"
mv -T "$staging" "$KERNEL_CLONE" 2>/dev/null || rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT  # a failed clone leaves nothing in the cache
step "done"
