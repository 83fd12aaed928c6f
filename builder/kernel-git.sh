# Kernel from a git tag: prepared out of tree (O=) with the target's config, so that the clone
# stays clean and is shared, and the prepared tree is shared by every driver built against it.
# In:  KERNEL_CLONE (read-only), KERNEL_CONFIG, KERNEL_SYMVERS (may be empty), KERNEL_PREPARED,
#      KERNEL_SUFFIX, KERNEL_RELEASE, JOBS        Out: SYSSRC, SYSOUT
prepare_kernel() {
    step "prepare kernel (olddefconfig, modules_prepare)"
    out="$KERNEL_PREPARED"
    cp "$KERNEL_CONFIG" "$out/.config"
    # The whole suffix of the release comes from LOCALVERSION, so that `make kernelrelease` is the
    # target release exactly (no CONFIG_LOCALVERSION, no "+" from an unclean tree).
    # Signing keys are for the kernel's own build: an external module build needs none of them.
    echo "config: CONFIG_LOCALVERSION=\"\", LOCALVERSION_AUTO off; module signing keys cleared" \
         "(MODULE_SIG_ALL off, no SYSTEM_TRUSTED_KEYS/REVOCATION_KEYS): external builds need no keys"
    "$KERNEL_CLONE/scripts/config" --file "$out/.config" --set-str LOCALVERSION "" --disable LOCALVERSION_AUTO \
        --disable MODULE_SIG_ALL --set-str SYSTEM_TRUSTED_KEYS "" --set-str SYSTEM_REVOCATION_KEYS "" \
        --set-str MODULE_SIG_KEY "certs/signing_key.pem"
    make -C "$KERNEL_CLONE" O="$out" LOCALVERSION="$KERNEL_SUFFIX" olddefconfig
    make -C "$KERNEL_CLONE" O="$out" LOCALVERSION="$KERNEL_SUFFIX" -j"$JOBS" modules_prepare
    got=$(make -s -C "$KERNEL_CLONE" O="$out" LOCALVERSION="$KERNEL_SUFFIX" kernelrelease)
    [ "$got" = "$KERNEL_RELEASE" ] || die "the prepared tree's release is $got, not $KERNEL_RELEASE"
    if [ -n "${KERNEL_SYMVERS:-}" ]; then
        cp "$KERNEL_SYMVERS" "$out/Module.symvers"
    fi
    kernel_paths
}

kernel_paths() {
    SYSSRC="$KERNEL_CLONE"
    SYSOUT="$KERNEL_PREPARED"
    [ -f "$SYSOUT/.config" ] || die "the prepared tree $SYSOUT has no .config"
}
