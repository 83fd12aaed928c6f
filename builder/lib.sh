# Helpers for the builder scripts. Step markers on stdout become named steps on the host.
step() { echo "::cudabuild-step::$1"; }
die() { echo "error: $*" >&2; exit 1; }

# What the kernel's own .config says about building against it (FACTS.md, "Debian 13 trixie"):
# its compiler (the builder must have the same gcc major), PREEMPT_RT (NVIDIA's build refuses it
# unless IGNORE_PREEMPT_RT=1, which only the user's --ignore-preempt-rt sets), DRM (without it
# nvidia-drm is an empty stub, which cudabuild never delivers as a working module).
# In: $1 (the .config), MODULES, IGNORE_PREEMPT_RT
check_kernel_config() {
    cc_text=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$1")
    case "$cc_text" in
        *gcc*)
            want=$(echo "$cc_text" | sed -n 's/.*) \([0-9][0-9]*\)\..*/\1/p')
            if [ -n "$want" ]; then
                have=$(gcc-"$want" -dumpversion 2>/dev/null) \
                    || die "the kernel was built with $cc_text, and this builder has no gcc-$want"
                echo "compiler: gcc-$want $have (the kernel's: $cc_text)"
            fi ;;
    esac
    if grep -q '^CONFIG_PREEMPT_RT=y' "$1"; then
        [ "$IGNORE_PREEMPT_RT" = 1 ] || die "the kernel is PREEMPT_RT, which NVIDIA's build refuses (pass --ignore-preempt-rt to build anyway)"
        echo "PREEMPT_RT kernel: IGNORE_PREEMPT_RT_PRESENCE=1, as asked"
        export IGNORE_PREEMPT_RT_PRESENCE=1
    fi
    if ! grep -q '^CONFIG_DRM=[ym]' "$1"; then
        case " $MODULES " in
            *" nvidia-drm "*) die "the kernel has no DRM (CONFIG_DRM is not set): nvidia-drm would be an empty stub; build without it (--only-modules without nvidia-drm)" ;;
        esac
    fi
    return 0
}
