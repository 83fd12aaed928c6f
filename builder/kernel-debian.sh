# Kernel from Debian's headers packages: unpack linux-headers-<release>, its -common package and
# linux-kbuild into one tree, cached under /cudabuild/kernels and shared by every driver build.
# In:  KERNEL_RELEASE, KERNEL_DEBS (paths), KERNEL_TREE (where the unpacked tree lives)
# Out: SYSSRC, SYSOUT
prepare_kernel() {
    if [ -d "$KERNEL_TREE" ]; then
        cached "unpack kernel headers" "reusing $KERNEL_TREE"
    else
        step "unpack kernel headers"
        staging="$KERNEL_TREE.partial.$$"
        rm -rf "$staging"
        mkdir -p "$staging"
        for deb in $KERNEL_DEBS; do
            dpkg-deb -x "$deb" "$staging"
        done
        # Another build may have finished the same tree meanwhile: keep the first one.
        mv -T "$staging" "$KERNEL_TREE" 2>/dev/null || rm -rf "$staging"
    fi
    SYSOUT="$KERNEL_TREE/usr/src/linux-headers-$KERNEL_RELEASE"
    [ -f "$SYSOUT/.config" ] || die "the headers of $KERNEL_RELEASE have no .config at $SYSOUT"
    SYSSRC=$(sed -n 's#^include /usr/src/\(linux-headers-[^/]*\)/Makefile$#\1#p' "$SYSOUT/Makefile")
    [ -n "$SYSSRC" ] || die "cannot find the -common tree that $SYSOUT/Makefile includes"
    SYSSRC="$KERNEL_TREE/usr/src/$SYSSRC"
    [ -d "$SYSSRC" ] || die "the headers' common tree $SYSSRC is missing"
    echo "kernel tree: SYSSRC=$SYSSRC SYSOUT=$SYSOUT"
}
