# Sourced by the compiler wrappers build.sh puts first in PATH when the build has a compile cache;
# cb_real is the compiler the wrapper stands for. Three kinds of call:
# - a compile that writes a dependency file (kbuild's -Wp,-MMD,...): through ccache;
# - an option probe, a compile of /dev/null (kbuild's cc-option and cc-disable-warning): its answer
#   (exit status, output, object) is kept for this build and given again to the same call, in the
#   same directory. NVIDIA's Kbuild expands its conftest flags, and with them four such probes,
#   once for each of its ~380 compile tests: ~1500 compiler runs of ~20 ms for four answers;
# - anything else (NVIDIA's conftest compile tests, whose sources differ): the compiler alone.
# The answers live in the build's work directory, and go with it.
case " $* " in
*" -Wp,-MMD,"* | *" -Wp,-MD,"* | *" -MMD "* | *" -MD "*) exec ccache "$cb_real" "$@" ;;
*" -include"* | *" -imacros"* | *" @"* | *" - "*) exec "$cb_real" "$@" ;; # reads more than its arguments
*" -x c /dev/null "*) ;;
*) exec "$cb_real" "$@" ;;
esac
cb_output=
cb_next=
for cb_arg; do
    [ -n "$cb_next" ] && cb_output=$cb_arg
    cb_next=
    [ "$cb_arg" = -o ] && cb_next=1
done
[ -n "$cb_output" ] || exec "$cb_real" "$@"
# the call, but for where it writes its object: the compiler, the directory, every other argument
cb_key=$({ echo "$cb_real"; pwd; for cb_arg; do
    [ "$cb_arg" = "$cb_output" ] && cb_arg=-o-file
    printf '%s\0' "$cb_arg"
done; } | sha256sum)
cb_answer="$WORK/compiler-answers/${cb_key%% *}"
if [ -f "$cb_answer/status" ]; then
    read -r cb_status < "$cb_answer/status"
    [ -s "$cb_answer/stdout" ] && cat "$cb_answer/stdout"
    [ -s "$cb_answer/stderr" ] && cat "$cb_answer/stderr" >&2
    [ -f "$cb_answer/object" ] && cp "$cb_answer/object" "$cb_output"
    echo again >> "$WORK/compiler-answers.log"
    exit "$cb_status"
fi
cb_new="$WORK/compiler-answers/.new.$$"
mkdir -p "$cb_new"
cb_status=0
"$cb_real" "$@" > "$cb_new/stdout" 2> "$cb_new/stderr" || cb_status=$?
[ "$cb_status" -eq 0 ] && [ -f "$cb_output" ] && cp "$cb_output" "$cb_new/object"
echo "$cb_status" > "$cb_new/status"
[ -s "$cb_new/stdout" ] && cat "$cb_new/stdout"
[ -s "$cb_new/stderr" ] && cat "$cb_new/stderr" >&2
# kept whole or not at all: a call beside this one may have kept the same answer first
mv -T "$cb_new" "$cb_answer" 2> /dev/null || rm -rf "$cb_new"
echo asked >> "$WORK/compiler-answers.log"
exit "$cb_status"
