# Driver from NVIDIA's .run installer. The host checked the installer's shape and extracted it with
# no ../, absolute or outward-pointing members (cudabuild/sources/run.py); this copies the module
# tree it builds from there. Layouts: 355 and newer have one Kbuild tree kernel/ (and kernel-open/
# from 515); up to 352, kernel/ builds nvidia.ko and kernel/uvm/ builds nvidia-uvm.ko separately.
# In: DRIVER_TREE (the extracted installer, read-only), DRIVER_SUBDIR (kernel or kernel-open),
#     DRIVER_VERSION, MODULES (NVIDIA's Kbuild builds the ones NV_KERNEL_MODULES names), WORK
# Out: DRIVER_DIR
extract_driver() {
    step "copy driver source"
    DRIVER_DIR="$WORK/$DRIVER_SUBDIR"
    cp -R --preserve=mode,timestamps "$DRIVER_TREE/$DRIVER_SUBDIR" "$DRIVER_DIR"
    [ -f "$DRIVER_DIR/Makefile" ] || die "the installer has no $DRIVER_SUBDIR/Makefile"
    echo "driver tree: $DRIVER_DIR"
}
build_driver() {
    step "make modules"
    if [ -f "$DRIVER_DIR/Kbuild" ]; then
        echo "make -C $DRIVER_DIR -j$JOBS SYSSRC=$SYSSRC SYSOUT=$SYSOUT NV_KERNEL_MODULES=\"$MODULES\" modules"
        make -C "$DRIVER_DIR" -j"$JOBS" SYSSRC="$SYSSRC" SYSOUT="$SYSOUT" NV_KERNEL_MODULES="$MODULES" NV_VERBOSE=1 modules
    else
        # 352-style: nvidia.ko from kernel/, nvidia-uvm.ko from kernel/uvm/.
        make -C "$DRIVER_DIR" SYSSRC="$SYSSRC" SYSOUT="$SYSOUT" module
        if [ -d "$DRIVER_DIR/uvm" ] && case " $MODULES " in *" nvidia-uvm "*) true ;; *) false ;; esac; then
            make -C "$DRIVER_DIR/uvm" SYSSRC="$SYSSRC" SYSOUT="$SYSOUT" module
            cp "$DRIVER_DIR/uvm/nvidia-uvm.ko" "$DRIVER_DIR/"
        fi
    fi
}

# The userspace files of the installer's .manifest (libraries, nvidia-smi, GSP firmware), with the
# SONAME links the installer would make.
collect_userspace() {
    tree="$DRIVER_TREE"
    mkdir -p "$OUT/userspace/lib" "$OUT/userspace/bin"
    for lib in libcuda libnvidia-ml libnvidia-ptxjitcompiler libnvidia-nvvm libnvidia-cfg libnvidia-allocator \
               libnvidia-fatbinaryloader libnvidia-compiler libcudadebugger libnvidia-opencl; do
        file="$tree/$lib.so.$DRIVER_VERSION"
        [ -f "$file" ] || continue
        cp "$file" "$OUT/userspace/lib/"
        soname=$(readelf -d "$file" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
        if [ -n "$soname" ] && [ "$soname" != "$lib.so.$DRIVER_VERSION" ]; then
            ln -sf "$lib.so.$DRIVER_VERSION" "$OUT/userspace/lib/$soname"
        fi
    done
    [ -f "$OUT/userspace/lib/libcuda.so.$DRIVER_VERSION" ] || die "the installer has no libcuda.so.$DRIVER_VERSION"
    [ -f "$tree/nvidia-smi" ] && cp "$tree/nvidia-smi" "$OUT/userspace/bin/"
    if [ -d "$tree/firmware" ]; then
        mkdir -p "$OUT/userspace/firmware/nvidia/$DRIVER_VERSION"
        cp "$tree"/firmware/* "$OUT/userspace/firmware/nvidia/$DRIVER_VERSION/"
    fi
    return 0
}
