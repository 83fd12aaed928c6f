#!/bin/sh
# Signs the built modules with the user's key: the kernel's own scripts/sign-file (Debian's
# linux-kbuild package, or the prepared git tree) and the hash the kernel's .config names
# (CONFIG_MODULE_SIG_HASH). Runs in its own container, with no network and no capabilities:
# /cudabuild/key            key.pem, cert.pem and the key's PIN (pin), read-only, this step only
# /cudabuild/kernels        the kernel trees (read-only)
# /cudabuild/work/modules   the stripped modules, signed in place
# Nothing here prints anything of the key.
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/kernel-$KERNEL_SOURCE.sh"

kernel_paths >/dev/null
sign_file="$SYSOUT/scripts/sign-file"
[ -x "$sign_file" ] || die "the kernel tree has no scripts/sign-file ($sign_file); a git kernel needs CONFIG_MODULE_SIG in its --kernel-config"
hash=$(sed -n 's/^CONFIG_MODULE_SIG_HASH="\([a-z0-9]*\)"$/\1/p' "$SYSOUT/.config")
if [ -z "$hash" ]; then
    hash=sha256
    echo "the kernel's .config names no CONFIG_MODULE_SIG_HASH; signing with sha256"
fi
if [ -f /cudabuild/key/pin ]; then
    KBUILD_SIGN_PIN=$(cat /cudabuild/key/pin)
    export KBUILD_SIGN_PIN
fi

step "sign modules ($hash, the kernel's sign-file)"
for name in $MODULES; do
    ko="$WORK/modules/$name.ko"
    [ -f "$ko" ] || die "$name.ko is missing; nothing was signed"
    "$sign_file" "$hash" /cudabuild/key/key.pem /cudabuild/key/cert.pem "$ko" \
        || die "sign-file could not sign $name.ko (a key it cannot read, or a wrong KBUILD_SIGN_PIN)"
    echo "signed $name.ko"
done
step "done"
