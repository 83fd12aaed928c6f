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
#   16 the GPUs' information in /proc/driver/nvidia cannot be read
#   17 the image's loader settings are malformed
#   18 the GPU selection names a GPU that does not exist
#   19 the kernel enforces module signatures (Secure Boot) and the modules are unsigned
# Its settings (loader.conf) and the device facts it shares with cudabuild (nvidia-devices.conf:
# majors, minors, load order, which variables select GPUs) are KEY=VALUE lines, read and checked,
# never executed.
# Test seams: every /proc, /sys and /dev path is taken under $CUDABUILD_ROOT; modules are loaded
# with $CUDABUILD_INSMOD; the running release is $CUDABUILD_KERNEL_RELEASE. CUDABUILD_LOADER=skip
# runs the command without loading anything. `cudabuild install` passes ROOT's dev, proc and sys
# resolved inside ROOT (CUDABUILD_DEV, _PROC, _SYS); the loader never writes through a symlink.
set -eu

ROOT=${CUDABUILD_ROOT:-}
ROOT=${ROOT%/}
DEV=${CUDABUILD_DEV:-$ROOT/dev}
PROC=${CUDABUILD_PROC:-$ROOT/proc}
SYS=${CUDABUILD_SYS:-$ROOT/sys}
INSMOD=${CUDABUILD_INSMOD:-insmod}
MODPROBE=${CUDABUILD_MODPROBE:-modprobe}
LDCONFIG=${CUDABUILD_LDCONFIG:-ldconfig}
HOME_DIR=${CUDABUILD_HOME:-/opt/cudabuild}

say() { echo "cudabuild-loader: $*" >&2; }
fail() { code=$1; shift; say "$*"; exit "$code"; }

# Settings (loader.conf) and NVIDIA's device facts (nvidia-devices.conf, shared with cudabuild's
# Python code): KEY=VALUE lines, each value letters, digits, '.', '_', '+', '-' and spaces, nothing else.
DRIVER_VERSION= KERNEL_RELEASE= MODULES= KERNEL_DEPENDS=
LOAD_ORDER= OPTIONAL_MODULES= GPU_MAJOR= CTL_MINOR= MODESET_MINOR= UVM_DEVICE= UVM_MINOR= UVM_TOOLS_MINOR= NODE_MODE=
SELECTION_VARIABLES=
read_settings() { # file key...
    file=$1; shift
    [ -f "$file" ] || fail 17 "the image has no $file; rebuild it with cudabuild image"
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in ''|'#'*) continue ;; esac
        key=${line%%=*}
        value=${line#*=}
        case "$value" in *[!A-Za-z0-9._+\ -]*) fail 17 "$file: the value of $key holds characters a setting may not; rebuild the image with cudabuild image" ;; esac
        case "$key" in ''|*[!A-Z_]*) fail 17 "$file: a line is not KEY=VALUE; rebuild the image with cudabuild image" ;; esac
        case " $* " in *" $key "*) ;; *) fail 17 "$file: unknown setting $key; rebuild the image with cudabuild image" ;; esac
        eval "$key=\$value"
    done < "$file"
}
read_settings "$HOME_DIR/loader.conf" DRIVER_VERSION KERNEL_RELEASE MODULES KERNEL_DEPENDS
read_settings "$HOME_DIR/nvidia-devices.conf" LOAD_ORDER OPTIONAL_MODULES GPU_MAJOR CTL_MINOR MODESET_MINOR \
    UVM_DEVICE UVM_MINOR UVM_TOOLS_MINOR NODE_MODE SELECTION_VARIABLES
[ -n "$DRIVER_VERSION" ] && [ -n "$KERNEL_RELEASE" ] && [ -n "$MODULES" ] && [ -n "$GPU_MAJOR" ] \
    || fail 17 "the loader's settings lack DRIVER_VERSION, KERNEL_RELEASE, MODULES or the device facts; rebuild the image with cudabuild image"
FIRMWARE=${CUDABUILD_FIRMWARE:-$HOME_DIR/firmware}  # as the kernel sees it (install runs from /host)

[ $# -gt 0 ] || fail 15 "no command given; pass one after the image name"

if [ "${CUDABUILD_LOADER:-}" = skip ]; then
    exec "$@"
fi

# 1. Can we load modules at all?
capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' "$PROC/self/status" 2>/dev/null || true)
case "$capeff" in ''|*[!0-9a-fA-F]*) capeff=0 ;; esac
if [ $(( 0x$capeff & 0x10000 )) -eq 0 ]; then
    fail 10 "this image loads the NVIDIA driver; run it with --privileged (it lacks CAP_SYS_MODULE)"
fi

# 2. The running kernel must be the modules' kernel.
running=${CUDABUILD_KERNEL_RELEASE:-$(uname -r)}
if [ "$running" != "$KERNEL_RELEASE" ]; then
    fail 11 "the modules are for kernel $KERNEL_RELEASE but this host runs $running; build them for this kernel: cudabuild modules --kernel $running"
fi

# 3. nouveau holds the GPUs.
if [ -d "$SYS/module/nouveau" ]; then
    fail 12 "the nouveau driver is loaded and holds the GPUs; blacklist it on the host (echo 'blacklist nouveau' > /etc/modprobe.d/blacklist-nouveau.conf; options nouveau modeset=0), then reboot"
fi

# 4. An NVIDIA driver already loaded: the same version is fine (what is missing of it is loaded
#    below), another one is not.
if [ -d "$SYS/module/nvidia" ]; then
    loaded=$(cat "$SYS/module/nvidia/version" 2>/dev/null || echo unknown)
    if [ "$loaded" = "$DRIVER_VERSION" ]; then
        say "NVIDIA $loaded is already loaded; loading only what is missing of it"
    else
        holders=$(ls "$SYS/module/nvidia/holders" 2>/dev/null | tr '\n' ' ')
        refcnt=$(cat "$SYS/module/nvidia/refcnt" 2>/dev/null || echo "?")
        fail 13 "NVIDIA $loaded is loaded but this image has $DRIVER_VERSION (\"Driver/library version mismatch\" would follow); it is held by: ${holders:-no module} (refcount $refcnt). Stop what uses the GPU and unload it (rmmod nvidia_drm nvidia_modeset nvidia_uvm nvidia), or use an image built for $loaded"
    fi
fi

# 5. Secure Boot: a kernel that enforces signatures refuses unsigned modules ("Loading of unsigned
#    module is rejected"); say so, and how to sign them, before anything is loaded.
enforced=$(cat "$SYS/module/module/parameters/sig_enforce" 2>/dev/null || echo N)
if [ "$enforced" = Y ]; then
    for module in $MODULES; do
        if [ "$(tail -c 28 "$HOME_DIR/modules/$module.ko" 2>/dev/null)" != "~Module signature appended~" ]; then
            fail 19 "this kernel enforces module signatures (Secure Boot, sig_enforce=Y) and $module.ko is unsigned; build the modules signed: cudabuild modules --kernel $KERNEL_RELEASE --sign-key KEY.pem --sign-cert CERT.pem, and enroll the certificate on the host: mokutil --import CERT.der, then reboot"
        fi
    done
    say "this kernel enforces module signatures; the modules are signed (their certificate must be enrolled: mokutil --list-enrolled)"
fi

# 6. The kernel's own modules ours need (drm, ipmi_msghandler, ...), then ours in dependency order.
for dep in $KERNEL_DEPENDS; do
    [ -d "$SYS/module/$(echo "$dep" | tr - _)" ] && continue
    $MODPROBE "$dep" 2>/dev/null || say "could not load the kernel's $dep, which the NVIDIA modules use; trying anyway"
done
if [ -d "$HOME_DIR/firmware" ] && [ -e "$SYS/module/firmware_class/parameters/path" ] \
        && [ ! -L "$SYS/module/firmware_class/parameters/path" ]; then
    echo "$FIRMWARE" > "$SYS/module/firmware_class/parameters/path"
fi
wanted=$LOAD_ORDER
if [ "${NVIDIA_PEERMEM:-0}" = 1 ]; then wanted="$wanted $OPTIONAL_MODULES"; fi
for module in $wanted; do
    case " $MODULES " in *" $module "*) ;; *) continue ;; esac
    sysname=$(echo "$module" | tr - _)
    [ -d "$SYS/module/$sysname" ] && continue
    if ! $INSMOD "$HOME_DIR/modules/$module.ko"; then
        if [ "$enforced" = Y ]; then
            fail 14 "loading $module.ko failed; the kernel's reason is in dmesg (dmesg | tail); \"Key was rejected by service\" means its certificate is not enrolled: mokutil --import CERT.der, then reboot"
        fi
        fail 14 "loading $module.ko failed; the kernel's reason is in dmesg (dmesg | tail)"
    fi
    say "loaded $module"
done

# 7. Device nodes for the selected GPUs.
mknode() { # path major minor; a link planted there is replaced, never followed
    [ -c "$1" ] && [ ! -L "$1" ] && return 0
    [ ! -d "$1" ] || [ -L "$1" ] || fail 16 "$1 is a directory where the device node belongs; remove it"
    rm -f "$1"
    mknod -m "$NODE_MODE" "$1" c "$2" "$3"
}
selection=all
for variable in $SELECTION_VARIABLES; do  # the first that is set wins (nvidia-devices.conf)
    eval "value=\${$variable:-}"
    if [ -n "$value" ]; then selection=$value; break; fi
done
[ -L "$DEV" ] || mkdir -p "$DEV"
index=0
gpus=""  # index:minor:uuid ...
for gpu in $(ls "$PROC/driver/nvidia/gpus" 2>/dev/null | sort); do
    info="$PROC/driver/nvidia/gpus/$gpu/information"
    if [ -L "$info" ] || ! fields=$(head -c 65536 "$info" 2>/dev/null); then
        fail 16 "cannot read $info, where the driver describes GPU $gpu; check that nvidia.ko loaded (dmesg | tail)"
    fi
    minor=$(echo "$fields" | sed -n 's/^Device Minor:[[:space:]]*//p')
    uuid=$(echo "$fields" | sed -n 's/^GPU UUID:[[:space:]]*//p')
    case "$minor" in ''|*[!0-9]*|????*) fail 16 "$info names no device minor for GPU $gpu" ;; esac
    [ "$minor" -le 254 ] || fail 16 "$info names device minor $minor for GPU $gpu, past the last (254)"
    gpus="$gpus $index:$minor:$uuid"
    index=$((index + 1))
done
case "$selection" in
    all) chosen=$gpus ;;
    none|void) chosen="" ;;
    *) chosen=""
       for want in $(echo "$selection" | tr ',' ' '); do
           match=""
           for entry in $gpus; do
               i=${entry%%:*}; rest=${entry#*:}; u=${rest#*:}
               if [ "$want" = "$i" ] || [ "$want" = "$u" ]; then match=$entry; fi
           done
           if [ -z "$match" ]; then
               existing=$(for entry in $gpus; do i=${entry%%:*}; rest=${entry#*:}; printf '%s (%s), ' "$i" "${rest#*:}"; done)
               fail 18 "GPU selection names GPU $want, which does not exist; the GPUs here: ${existing%, }"
           fi
           chosen="$chosen $match"
       done ;;
esac
for entry in $chosen; do
    rest=${entry#*:}
    mknode "$DEV/nvidia${rest%%:*}" "$GPU_MAJOR" "${rest%%:*}"
done
if [ "$selection" != void ]; then
    mknode "$DEV/nvidiactl" "$GPU_MAJOR" "$CTL_MINOR"
    if [ -d "$SYS/module/nvidia_modeset" ]; then mknode "$DEV/nvidia-modeset" "$GPU_MAJOR" "$MODESET_MINOR"; fi
    uvm_major=$(sed -n "s/^[[:space:]]*\([0-9]*\) $UVM_DEVICE\$/\1/p" "$PROC/devices" 2>/dev/null || true)
    if [ -n "$uvm_major" ]; then
        mknode "$DEV/nvidia-uvm" "$uvm_major" "$UVM_MINOR"
        mknode "$DEV/nvidia-uvm-tools" "$uvm_major" "$UVM_TOOLS_MINOR"
    fi
fi

# 8. The userspace driver, then the command.
$LDCONFIG 2>/dev/null || true
exec "$@"
