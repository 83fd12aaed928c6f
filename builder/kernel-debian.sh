# Kernel from Debian's headers packages: linux-headers-<release>, its -common package and
# linux-kbuild unpacked into one tree, shared by every driver build.
# In:  KERNEL_RELEASE, KERNEL_DEBS (paths), KERNEL_TREE (the tree)   Out: SYSSRC, SYSOUT
prepare_kernel() {
    step "unpack kernel headers"
    for deb in $KERNEL_DEBS; do
        dpkg-deb -x "$deb" "$KERNEL_TREE"
    done
    kernel_paths
}

kernel_paths() {
    SYSOUT="$KERNEL_TREE/usr/src/linux-headers-$KERNEL_RELEASE"
    [ -f "$SYSOUT/.config" ] || die "the headers of $KERNEL_RELEASE have no .config at $SYSOUT"
    SYSSRC=$(sed -n 's#^include /usr/src/\(linux-headers-[^/]*\)/Makefile$#\1#p' "$SYSOUT/Makefile")
    [ -n "$SYSSRC" ] || die "cannot find the -common tree that $SYSOUT/Makefile includes"
    SYSSRC="$KERNEL_TREE/usr/src/$SYSSRC"
    [ -d "$SYSSRC" ] || die "the headers' common tree $SYSSRC is missing"
    echo "kernel tree: SYSSRC=$SYSSRC SYSOUT=$SYSOUT"
}
