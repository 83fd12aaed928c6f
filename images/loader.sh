#!/bin/sh
# cudabuild loader: the entrypoint of a runtime image. Loads the NVIDIA modules baked into the
# image, creates the device nodes, then runs the command: `exec "$@"`.
#
# Exit codes of its own (otherwise the command's):
#   10 cannot load modules (no CAP_SYS_MODULE): run the image with --privileged
#   11 the running kernel is not the one the modules were built for
#   12 nouveau is loaded
#   13 another NVIDIA driver version is loaded
#   14 a module failed to load
#   15 no command given
# Test seams: every /proc, /sys and /dev path is taken under $CUDABUILD_ROOT; modules are loaded
# with $CUDABUILD_INSMOD; the running release is $CUDABUILD_KERNEL_RELEASE. CUDABUILD_LOADER=skip
# runs the command without loading anything.
set -eu

ROOT=${CUDABUILD_ROOT:-}
ROOT=${ROOT%/}
INSMOD=${CUDABUILD_INSMOD:-insmod}
MODPROBE=${CUDABUILD_MODPROBE:-modprobe}
LDCONFIG=${CUDABUILD_LDCONFIG:-ldconfig}
HOME_DIR=${CUDABUILD_HOME:-/opt/cudabuild}
. "$HOME_DIR/driver.env"   # DRIVER_VERSION KERNEL_RELEASE MODULES NEEDS_IPMI

say() { echo "cudabuild-loader: $*" >&2; }
fail() { code=$1; shift; say "$*"; exit "$code"; }

[ $# -gt 0 ] || fail 15 "no command given; pass one after the image name"

if [ "${CUDABUILD_LOADER:-}" = skip ]; then
    exec "$@"
fi

# 1. Can we load modules at all?
capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' "$ROOT/proc/self/status" 2>/dev/null || true)
if [ -z "$capeff" ] || [ $(( 0x$capeff & 0x10000 )) -eq 0 ]; then
    fail 10 "this image loads the NVIDIA driver; run it with --privileged (it lacks CAP_SYS_MODULE)"
fi

# 2. The running kernel must be the modules' kernel.
running=${CUDABUILD_KERNEL_RELEASE:-$(uname -r)}
if [ "$running" != "$KERNEL_RELEASE" ]; then
    fail 11 "the modules are for kernel $KERNEL_RELEASE but this host runs $running; build them for this kernel: cudabuild modules --kernel $running"
fi

# 3. nouveau holds the GPUs.
if [ -d "$ROOT/sys/module/nouveau" ]; then
    fail 12 "the nouveau driver is loaded and holds the GPUs; blacklist it on the host (echo 'blacklist nouveau' > /etc/modprobe.d/blacklist-nouveau.conf; options nouveau modeset=0), then reboot"
fi

# 4. An NVIDIA driver already loaded: the same version is fine, another one is not.
skip_load=0
if [ -d "$ROOT/sys/module/nvidia" ]; then
    loaded=$(cat "$ROOT/sys/module/nvidia/version" 2>/dev/null || echo unknown)
    if [ "$loaded" = "$DRIVER_VERSION" ]; then
        say "NVIDIA $loaded is already loaded; not loading it again"
        skip_load=1
    else
        holders=$(ls "$ROOT/sys/module/nvidia/holders" 2>/dev/null | tr '\n' ' ')
        refcnt=$(cat "$ROOT/sys/module/nvidia/refcnt" 2>/dev/null || echo "?")
        fail 13 "NVIDIA $loaded is loaded but this image has $DRIVER_VERSION (\"Driver/library version mismatch\" would follow); it is held by: ${holders:-no module} (refcount $refcnt). Stop what uses the GPU and unload it (rmmod nvidia_drm nvidia_modeset nvidia_uvm nvidia), or use an image built for $loaded"
    fi
fi

# 5. Load in dependency order.
if [ "$skip_load" -eq 0 ]; then
    if [ "${NEEDS_IPMI:-0}" = 1 ] && [ ! -d "$ROOT/sys/module/ipmi_msghandler" ]; then
        $MODPROBE ipmi_msghandler 2>/dev/null || say "could not load ipmi_msghandler (nvidia.ko of this branch uses it); trying anyway"
    fi
    if [ -d "$HOME_DIR/firmware" ] && [ -e "$ROOT/sys/module/firmware_class/parameters/path" ]; then
        echo "$HOME_DIR/firmware" > "$ROOT/sys/module/firmware_class/parameters/path"
    fi
    wanted="nvidia nvidia-uvm nvidia-modeset nvidia-drm"
    if [ "${NVIDIA_PEERMEM:-0}" = 1 ]; then wanted="$wanted nvidia-peermem"; fi
    for module in $wanted; do
        case " $MODULES " in *" $module "*) ;; *) continue ;; esac
        sysname=$(echo "$module" | tr - _)
        [ -d "$ROOT/sys/module/$sysname" ] && continue
        if ! $INSMOD "$HOME_DIR/modules/$module.ko"; then
            fail 14 "loading $module.ko failed; the kernel's reason is in dmesg (dmesg | tail)"
        fi
    done
fi

# 6. Device nodes for the selected GPUs.
mknode() { # path major minor
    [ -c "$1" ] && return 0
    rm -f "$1"
    mknod -m 666 "$1" c "$2" "$3"
}
selection=${NVIDIA_VISIBLE_DEVICES:-${NV_GPU:-all}}
mkdir -p "$ROOT/dev"
index=0
for gpu in $(ls "$ROOT/proc/driver/nvidia/gpus" 2>/dev/null | sort); do
    info="$ROOT/proc/driver/nvidia/gpus/$gpu/information"
    minor=$(sed -n 's/^Device Minor:[[:space:]]*//p' "$info")
    uuid=$(sed -n 's/^GPU UUID:[[:space:]]*//p' "$info")
    selected=0
    case "$selection" in
        all) selected=1 ;;
        none|void|"") selected=0 ;;
        *) for want in $(echo "$selection" | tr ',' ' '); do
               if [ "$want" = "$index" ] || [ "$want" = "$uuid" ]; then selected=1; fi
           done ;;
    esac
    if [ "$selected" -eq 1 ]; then
        mknode "$ROOT/dev/nvidia$minor" 195 "$minor"
    fi
    index=$((index + 1))
done
if [ "$selection" != void ]; then
    mknode "$ROOT/dev/nvidiactl" 195 255
    if [ -d "$ROOT/sys/module/nvidia_modeset" ]; then mknode "$ROOT/dev/nvidia-modeset" 195 254; fi
    uvm_major=$(sed -n 's/^[[:space:]]*\([0-9]*\) nvidia-uvm$/\1/p' "$ROOT/proc/devices" 2>/dev/null || true)
    if [ -n "$uvm_major" ]; then
        mknode "$ROOT/dev/nvidia-uvm" "$uvm_major" 0
        mknode "$ROOT/dev/nvidia-uvm-tools" "$uvm_major" 1
    fi
fi

# 7. The userspace driver, then the command.
$LDCONFIG 2>/dev/null || true
exec "$@"
