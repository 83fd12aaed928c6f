# Kernel from a git tag: prepare it out of tree (O=) with the target's config, so that the clone
# stays clean and is shared, and the prepared tree is shared by every driver built against it.
# In:  KERNEL_CLONE, KERNEL_CONFIG, KERNEL_SYMVERS (may be empty), KERNEL_PREPARED, KERNEL_SUFFIX,
#      KERNEL_RELEASE, JOBS        Out: SYSSRC, SYSOUT
prepare_kernel() {
    SYSSRC="$KERNEL_CLONE"
    SYSOUT="$KERNEL_PREPARED"
    if [ -d "$KERNEL_PREPARED" ]; then
        cached "prepare kernel" "reusing the prepared tree $KERNEL_PREPARED"
        return 0
    fi
    step "prepare kernel (olddefconfig, modules_prepare)"
    out="$KERNEL_PREPARED.partial.$$"
    rm -rf "$out"
    trap 'rm -rf "$out"' EXIT  # a failed prepare leaves nothing in the cache
    mkdir -p "$out"
    cp "$KERNEL_CONFIG" "$out/.config"
    # The whole suffix of the release comes from LOCALVERSION, so that `make kernelrelease` is the
    # target release exactly (no CONFIG_LOCALVERSION, no "+" from an unclean tree).
    # Signing keys are for the kernel's own build: an external module build needs none of them.
    echo "config: CONFIG_LOCALVERSION=\"\", LOCALVERSION_AUTO off; module signing keys cleared" \
         "(MODULE_SIG_ALL off, no SYSTEM_TRUSTED_KEYS/REVOCATION_KEYS): external builds need no keys"
    "$SYSSRC/scripts/config" --file "$out/.config" --set-str LOCALVERSION "" --disable LOCALVERSION_AUTO \
        --disable MODULE_SIG_ALL --set-str SYSTEM_TRUSTED_KEYS "" --set-str SYSTEM_REVOCATION_KEYS "" \
        --set-str MODULE_SIG_KEY "certs/signing_key.pem"
    make -C "$SYSSRC" O="$out" LOCALVERSION="$KERNEL_SUFFIX" olddefconfig
    make -C "$SYSSRC" O="$out" LOCALVERSION="$KERNEL_SUFFIX" -j"$JOBS" modules_prepare
    got=$(make -s -C "$SYSSRC" O="$out" LOCALVERSION="$KERNEL_SUFFIX" kernelrelease)
    [ "$got" = "$KERNEL_RELEASE" ] || die "the prepared tree's release is $got, not $KERNEL_RELEASE"
    if [ -n "${KERNEL_SYMVERS:-}" ]; then
        cp "$KERNEL_SYMVERS" "$out/Module.symvers"
    fi
    mv -T "$out" "$KERNEL_PREPARED" 2>/dev/null || rm -rf "$out"
    trap - EXIT
}
