# Driver from Debian's module source package (nvidia-kernel-source, nvidia-tesla-*-kernel-source,
# nvidia-open-kernel-source): a tarball /usr/src/nvidia-*kernel.tar.xz with modules/<name>/.
# In:  DRIVER_DEB (unpack-driver.sh), DRIVER_TREE (its unpacked tree, read-only), MODULES (passed to
#      NVIDIA's Kbuild as NV_KERNEL_MODULES), WORK
# Out: DRIVER_DIR (the directory to run make in)

# The directory of the first Kbuild under $1 (empty when there is none): the one to run make in.
kbuild_dir() {
    found=$(find "$1" -maxdepth 3 -name Kbuild -print | head -n 1)
    [ -z "$found" ] || dirname "$found"
}

# Once per source package (unpack-driver.sh): its tarball unpacked into $1.
unpack_source() {
    step "unpack driver source"
    mkdir -p "$WORK/driver-deb" "$1"
    dpkg-deb -x "$DRIVER_DEB" "$WORK/driver-deb"
    set -- "$1" "$WORK"/driver-deb/usr/src/nvidia*kernel*.tar.xz
    [ -f "$2" ] || die "no nvidia*kernel*.tar.xz in the driver package"
    tar -xJf "$2" -C "$1"
    rm -rf "$WORK/driver-deb"
    [ -n "$(kbuild_dir "$1")" ] || die "no Kbuild tree found in the driver source"
}

# In each build: the unpacked source (DRIVER_TREE, read-only) copied into the work directory, with
# its files' times (as the tarball had them: older than anything the build writes).
extract_driver() {
    step "copy driver source"
    cp -R --preserve=mode,timestamps "$DRIVER_TREE" "$WORK/driver"
    DRIVER_DIR=$(kbuild_dir "$WORK/driver")
    [ -n "$DRIVER_DIR" ] && [ -f "$DRIVER_DIR/Makefile" ] || die "no Kbuild tree found in the driver source"
    echo "driver tree: $DRIVER_DIR"
}

build_driver() {
    step "make modules"
    echo "make -C $DRIVER_DIR -j$JOBS SYSSRC=$SYSSRC SYSOUT=$SYSOUT NV_KERNEL_MODULES=\"$MODULES\" modules"
    make -C "$DRIVER_DIR" -j"$JOBS" SYSSRC="$SYSSRC" SYSOUT="$SYSOUT" NV_KERNEL_MODULES="$MODULES" NV_VERBOSE=1 modules
}

# The userspace packages, flattened into userspace/{lib,bin,firmware}: the libraries with their
# SONAME links as the packages ship them, nvidia-smi, and the GSP firmware where there is one.
# In: USERSPACE_DEBS, WORK, OUT
collect_userspace() {
    root="$WORK/userspace-root"
    mkdir -p "$root" "$OUT/userspace/lib" "$OUT/userspace/bin"
    for deb in $USERSPACE_DEBS; do
        dpkg-deb -x "$deb" "$root"
    done
    find "$root" \( -type f -o -type l \) -name 'lib*.so*' -exec cp -a {} "$OUT/userspace/lib/" \;
    find "$root" -type f -name 'nvidia-smi' -exec cp -a {} "$OUT/userspace/bin/" \;
    for fw in "$root/lib/firmware" "$root/usr/lib/firmware"; do
        if [ -d "$fw" ]; then
            mkdir -p "$OUT/userspace/firmware"
            cp -a "$fw/." "$OUT/userspace/firmware/"
        fi
    done
    rm -rf "$root"
}
