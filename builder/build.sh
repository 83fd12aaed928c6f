#!/bin/sh
# Runs inside the builder container, with no privileges, no capabilities and no network.
# /cudabuild/builder    these scripts (read-only)
# /cudabuild/inputs     downloaded packages, by content (read-only)
# /cudabuild/kernels    unpacked and prepared kernel trees, shared between builds (read-only)
# /cudabuild/driver     the driver's sources (read-only): an NVIDIA installer, checked and extracted on
#                       the host, or Debian's source package, unpacked once (unpack-driver.sh)
# /cudabuild/work       this build's scratch space; the result goes to $WORK/out
# /cudabuild/compile-cache  ccache's directory, shared by the cache's builds (unless --no-compile-cache)
set -eu
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/kernel-$KERNEL_SOURCE.sh"
. "$here/driver-$DRIVER_SOURCE.sh"

WORK=${WORK:-/cudabuild/work}
OUT="$WORK/out"
mkdir -p "$OUT/modules"

# The kernel trees are shared by every build: this step must not be able to change them.
if touch /cudabuild/kernels/.cudabuild-write-probe 2>/dev/null; then
    rm -f /cudabuild/kernels/.cudabuild-write-probe
    die "the kernel trees are writable in the build step; refusing to build"
fi
echo "builder: uid $(id -u), capabilities $(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status), kernel trees read-only"

kernel_paths
check_kernel_config "$SYSOUT/.config"
extract_driver

conftest=""
if [ -n "$COMPILE_CACHE" ]; then
    # Debian's ccache in front of the compiles that make objects: the kernel trees and this driver
    # tree sit at the same paths in every build, so a rebuild hits. The stats log counts this
    # build alone (the host reads it).
    # Depend mode: a miss runs the compiler alone and takes the headers it read from kbuild's
    # -Wp,-MMD file, instead of running the preprocessor once more to hash its output. The inode
    # cache keeps those headers' hashes between calls (each call reads hundreds of them).
    # No compression: compressing every object made a first build's make 1.18x the bare make
    # (193.9/188.8 s against 175.6/151.8 s, interleaved), uncompressed it is 1.0x (168.1/150.3 s);
    # the cache is larger for it (BENCHMARKS.md), within its bound COMPILE_CACHE_SIZE.
    export CCACHE_DIR="$COMPILE_CACHE" CCACHE_MAXSIZE="$COMPILE_CACHE_SIZE" CCACHE_STATSLOG="$WORK/compile-cache.log"
    export CCACHE_DEPEND=1 CCACHE_INODECACHE=1 CCACHE_NOCOMPRESS=1
    # Every compiler name ccache knows (/usr/lib/ccache) is, first in PATH, a wrapper (compiler.sh):
    # a compile that writes a dependency file (kbuild's -Wp,-MMD,...) goes through ccache; an option
    # probe (a compile of /dev/null) is answered once per build; any other call (NVIDIA's conftest
    # tests) goes to the compiler alone. Through ccache each of those ~2000 probes and tests ran the
    # preprocessor once more: 172.5 s of compiler time against 124.4 s without it, a quarter of a
    # first build's make; and the tests' answers are kept apart (below), so a rebuild does not ask
    # them again.
    compilers="$WORK/compilers"
    mkdir -p "$compilers"
    scripts=$(cd "$here" && pwd)
    for name in $(ls /usr/lib/ccache); do
        real=$(command -v "$name") || continue
        printf '#!/bin/sh\ncb_real=%s\n. %s/compiler.sh\n' "$real" "$scripts" > "$compilers/$name"
        chmod 755 "$compilers/$name"
    done
    export PATH="$compilers:$PATH"
    # NVIDIA's conftest (hundreds of small compiles, a third of which fail by design, which ccache
    # cannot keep) answers questions about the kernel: its answers are kept too, by everything
    # they depend on (conftest.sh and the Kbuild files, the kernel tree, the modules asked for,
    # the builder's packages), and put back before make, newer than the sources, so that make
    # does not ask again.
    if [ -f "$DRIVER_DIR/conftest.sh" ]; then
        conftest_key=$( { find "$DRIVER_DIR" -maxdepth 2 \( -name conftest.sh -o -name '*Kbuild' \) -type f | sort | xargs cat
                          echo "$SYSSRC $SYSOUT $MODULES"; dpkg-query -W; } | sha256sum | cut -c1-32)
        conftest="$COMPILE_CACHE/conftest/$conftest_key.tar"
        if [ -f "$conftest" ] && tar -xf "$conftest" -C "$DRIVER_DIR"; then
            # one time for all, after the sources': make compares them, and an answer older than
            # another it was made from would be asked again
            : > "$WORK/.conftest-restored"
            find "$DRIVER_DIR/conftest" -exec touch -h -r "$WORK/.conftest-restored" {} +
            echo "conftest: the answers of an earlier build of the same sources for this kernel ($conftest)"
            conftest=""
        fi
    fi
fi

# An installer's userspace driver needs no compiler: it is collected beside make, off the build's
# critical path; what it says is shown after make, and its failure fails the build there.
# Debian's packages are unpacked once per set (unpack-driver.sh) and the host brings their tree.
if [ -n "$COLLECT_USERSPACE" ]; then
    ( collect_userspace ) > "$WORK/userspace.log" 2>&1 &
    userspace=$!
fi

build_driver

if [ -f "$WORK/compiler-answers.log" ]; then
    echo "option probes: $(grep -c '^asked$' "$WORK/compiler-answers.log") asked the compiler," \
         "$(grep -c '^again$' "$WORK/compiler-answers.log") more answered as it had answered them (compiler.sh)"
fi

step "strip debug info"
for name in $MODULES; do
    ko="$DRIVER_DIR/$name.ko"
    [ -f "$ko" ] || die "make finished but $name.ko was not built (expected in $DRIVER_DIR)"
    strip --strip-debug -o "$OUT/modules/$name.ko" "$ko"
done

if [ -n "$conftest" ] && [ -d "$DRIVER_DIR/conftest" ]; then
    mkdir -p "$COMPILE_CACHE/conftest"
    tar -cf "$conftest.$$" -C "$DRIVER_DIR" conftest && mv "$conftest.$$" "$conftest"
    # bounded like the compiles: the 64 newest kept
    ls -t "$COMPILE_CACHE"/conftest/*.tar | tail -n +65 | while read -r old; do rm -f "$old"; done
fi

if [ -n "$COLLECT_USERSPACE" ]; then
    step "collect userspace driver (beside make)"
    collected=0
    wait "$userspace" || collected=$?
    cat "$WORK/userspace.log"
    [ "$collected" -eq 0 ] || die "collecting the userspace driver failed (exit $collected)"
fi
step "done"
