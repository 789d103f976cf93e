#!/bin/sh
# check.sh: the proof that kv.c holds up (make check).
#
#   sh tools/check.sh              every check this machine has the tools for
#   sh tools/check.sh NAME...      only those (the names are listed below)
#   sh tools/check.sh --list       the names, in the order they run
#   CHECK_STRICT=1 sh tools/check.sh ...   a skipped check fails (CI: every
#                                  tool was installed, so none may be missing)
#
# Each build check compiles the top level and every stage of chapters/,
# runs each self-test, each stage's ./kv (its chapter's iex sessions) and,
# for the last stage and the top level, a scripted ./kv shell session.
# A check whose tool is missing is skipped, and says so; a check that fails
# prints what went wrong, and check.sh then ends with a non-zero status.
# Everything is built under build/check/.
#
#   gcc-O0 gcc-O2 gcc-O3 clang-O0 clang-O2 clang-O3
#                   -std=c99 -Wall -Wextra -Werror, at each level
#   gcc-pedantic clang-pedantic        ... and -pedantic
#   gcc-frame-pointers clang-frame-pointers    -fno-omit-frame-pointer
#   gcc-hardened clang-hardened        -D_FORTIFY_SOURCE=3, stack protector,
#                                      stack clash protection, and on x86-64
#                                      -fcf-protection=full
#   gcc-sanitizers clang-sanitizers    AddressSanitizer (use after return
#                                      included) and UndefinedBehaviorSanitizer
#   valgrind        memcheck, every leak kind an error
#   i386 musl aarch64                  -m32; musl-gcc -static; under qemu-user
#   chaos           the chaos test at its full count (KV_CHAOS_STEPS), and
#                   again under valgrind when it is here
#   fuzz            the shell's line handling and KVServer.Command.parse under
#                   libFuzzer (clang) or AFL++, for FUZZ_SECONDS
#   inspect-diff    inspect/1 and pretty inspect beside real Elixir's, on
#                   random terms (needs elixir)
set -u
cd "$(dirname "$0")/.."

ALL="gcc-O0 gcc-O2 gcc-O3 clang-O0 clang-O2 clang-O3 gcc-pedantic clang-pedantic
gcc-frame-pointers clang-frame-pointers gcc-hardened clang-hardened gcc-sanitizers clang-sanitizers
valgrind i386 musl aarch64 chaos fuzz inspect-diff"
WARN="-std=c99 -Wall -Wextra -Werror"
CHAOS_STEPS=${KV_CHAOS_STEPS:-100000}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
SHELL_SESSION='CREATE shopping\nPUT shopping milk 1\nGET shopping milk\nTREE\nKILL KV.Registry\nTREE\nGET shopping milk\nQUIT\n'

passed=0 failed=0 skipped=0
failures=""
pass() { echo "check $1: passed ($2)"; passed=$((passed + 1)); }
fail() { echo "check $1: FAILED ($2)"; failed=$((failed + 1)); failures="$failures $1"; }
skip() {
    if [ "${CHECK_STRICT:-}" = 1 ]; then fail "$1" "its tool is missing: $2"; return; fi
    echo "check $1: skipped, $2"
    skipped=$((skipped + 1))
}
have() { command -v "$1" >/dev/null 2>&1; }

# can_build CC FLAGS: a program with the headers kv.c uses builds and runs
can_build() {
    mkdir -p build/check
    printf '#include <errno.h>\n#include <setjmp.h>\n#include <stdio.h>\nint main(void) { return errno; }\n' >build/check/probe.c
    $1 $2 -o build/check/probe build/check/probe.c >/dev/null 2>&1 && build/check/probe
}

# build_and_run NAME CC CFLAGS LDFLAGS [RUNNER...]: the top level and every
# stage, built with CC CFLAGS, each self-test run (through RUNNER), each
# ./kv run, and the shell session for the last stage and the top level.
build_and_run() {
    name=$1 cc=$2 cflags=$3 ldflags=$4
    shift 4
    out=build/check/$name
    rm -rf "$out"
    mkdir -p "$out"
    summary=""
    for src in . chapters/*/; do
        src=${src%/}
        dest=$out/$(basename "$src" | sed 's/^\.$/top/')
        mkdir -p "$dest"
        if ! $cc $cflags -o "$dest/kv" "$src/kv.c" $ldflags >"$dest/build.log" 2>&1 ||
           ! $cc $cflags -o "$dest/kv_test" "$src/kv_test.c" $ldflags >>"$dest/build.log" 2>&1; then
            tail -n 20 "$dest/build.log"
            fail "$name" "$src does not build"
            return
        fi
        if ! (cd "$dest" && "$@" ./kv_test >test.log 2>&1); then
            grep -A 12 '^  [0-9]*) ' "$dest/test.log" | head -n 40
            tail -n 3 "$dest/test.log"
            fail "$name" "$src: its self-test fails"
            return
        fi
        if ! (cd "$dest" && "$@" ./kv >tour.log 2>&1); then
            tail -n 20 "$dest/tour.log"
            fail "$name" "$src: ./kv fails"
            return
        fi
        # the shell arrives with the last stage; the top level must have it
        if [ "$src" = . ] && ! grep -q 'shell_main' kv.c; then
            fail "$name" "kv.c has no ./kv shell (shell_main) to run the session with"
            return
        fi
        if grep -q 'shell_main' "$src/kv.c"; then
            printf "$SHELL_SESSION" | (cd "$dest" && "$@" ./kv shell >shell.log 2>shell.err)
            if [ $? -ne 0 ] || [ "$(tail -n 1 "$dest/shell.log")" != "NOT FOUND" ]; then
                cat "$dest/shell.log" "$dest/shell.err" | tail -n 20
                fail "$name" "$src: the shell session"
                return
            fi
        fi
        summary="$summary, $(basename "$src" | sed 's/^\.$/top level/; s/-.*//') $(tail -n 1 "$dest/test.log" | sed 's/, 0 failures//; s/ doctests\{0,1\}, /+/; s/ tests\{0,1\}//')"
    done
    pass "$name" "doctests+tests passed: ${summary#, }"
}

check_compilers() { # NAME: the gcc/clang rows
    cc=${1%%-*} what=${1#*-}
    have "$cc" || { skip "$1" "no $cc"; return; }
    case $what in
    O0 | O2 | O3) build_and_run "$1" "$cc" "$WARN -$what" "" ;;
    pedantic) build_and_run "$1" "$cc" "$WARN -pedantic -O2" "" ;;
    frame-pointers) build_and_run "$1" "$cc" "$WARN -O2 -fno-omit-frame-pointer" "" ;;
    hardened)
        flags="$WARN -O2 -D_FORTIFY_SOURCE=3 -fstack-protector-strong -fstack-clash-protection"
        [ "$(uname -m)" = x86_64 ] && flags="$flags -fcf-protection=full"
        build_and_run "$1" "$cc" "$flags" "" ;;
    sanitizers)
        flags="$WARN -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all"
        if ! can_build "$cc" "-fsanitize=address,undefined"; then skip "$1" "$cc has no AddressSanitizer here"; return; fi
        ASAN_OPTIONS=detect_stack_use_after_return=1:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
            build_and_run "$1" "$cc" "$flags" "-fsanitize=address,undefined" ;;
    esac
}

check_valgrind() {
    have valgrind || { skip valgrind "no valgrind"; return; }
    vg="valgrind -q --leak-check=full --errors-for-leak-kinds=all --error-exitcode=1 --child-silent-after-fork=yes"
    build_and_run valgrind cc "$WARN -O2 -g" "" $vg
}

check_i386() {
    can_build cc "-m32" || { skip i386 "cc -m32 cannot build here (Debian: gcc-multilib)"; return; }
    build_and_run i386 cc "$WARN -m32 -O2" ""
}

check_musl() {
    have musl-gcc || { skip musl "no musl-gcc (Debian: musl-tools)"; return; }
    build_and_run musl musl-gcc "$WARN -O2 -static" ""
}

check_aarch64() {
    have aarch64-linux-gnu-gcc || { skip aarch64 "no aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)"; return; }
    have qemu-aarch64 || { skip aarch64 "no qemu-aarch64 (Debian: qemu-user)"; return; }
    build_and_run aarch64 aarch64-linux-gnu-gcc "$WARN -O2" "" qemu-aarch64 -L /usr/aarch64-linux-gnu
}

# The chaos test at its full count; then, when valgrind is here, the same
# run under memcheck, so that every byte is seen back by malloc's count
# and not only by kv.c's own.
check_chaos() {
    out=build/check/chaos
    mkdir -p "$out"
    if ! cc $WARN -O2 -g -o "$out/kv_test" kv_test.c >"$out/build.log" 2>&1; then
        cat "$out/build.log"
        fail chaos "kv_test.c does not build"
        return
    fi
    if ! KV_CHAOS_STEPS=$CHAOS_STEPS "$out/kv_test" ChaosTest >"$out/test.log" 2>&1; then
        tail -n 30 "$out/test.log"
        fail chaos "$CHAOS_STEPS steps"
        return
    fi
    # the test must have run, with the count asked for
    if ! grep -q "^1 test, 0 failures" "$out/test.log" || ! grep -q ", $CHAOS_STEPS steps," "$out/test.log"; then
        tail -n 5 "$out/test.log"
        fail chaos "ChaosTest did not run $CHAOS_STEPS steps"
        return
    fi
    what="$(grep -o 'seed [^)]*' "$out/test.log" | head -n 1); $(tail -n 1 "$out/test.log")"
    if have valgrind; then
        if ! KV_CHAOS_STEPS=$CHAOS_STEPS valgrind -q --leak-check=full --errors-for-leak-kinds=all --error-exitcode=1 \
                "$out/kv_test" ChaosTest >"$out/valgrind.log" 2>&1; then
            tail -n 30 "$out/valgrind.log"
            fail chaos "$CHAOS_STEPS steps under valgrind"
            return
        fi
        what="$what; under valgrind too: 0 errors, 0 bytes lost"
    else
        what="$what; not under valgrind (none here)"
    fi
    pass chaos "$what"
}

check_fuzz() {
    out=build/check/fuzz
    mkdir -p "$out/corpus"
    cp fuzz/corpus/* "$out/corpus/"
    # libFuzzer brings its own main: the probe is a fuzz target that does nothing
    printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' >"$out/probe.c"
    if have clang && clang -fsanitize=fuzzer,address -o "$out/probe" "$out/probe.c" >/dev/null 2>&1; then
        if ! clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -o "$out/shell_fuzz" fuzz/shell_fuzz.c >"$out/build.log" 2>&1; then
            cat "$out/build.log"
            fail fuzz "fuzz/shell_fuzz.c does not build"
            return
        fi
        if (cd "$out" && ASAN_OPTIONS=detect_leaks=1 ./shell_fuzz -max_total_time="$FUZZ_SECONDS" -max_len=4096 \
                -timeout=10 -rss_limit_mb=4096 corpus >fuzz.log 2>&1); then
            pass fuzz "libFuzzer, $FUZZ_SECONDS s: $(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$out/fuzz.log") runs, no crash, leak or hang"
        else
            tail -n 40 "$out/fuzz.log"
            fail fuzz "libFuzzer found a crash, a leak or a hang (build/check/fuzz)"
        fi
    elif have afl-clang-fast && have afl-fuzz; then
        if ! afl-clang-fast -std=c99 -g -O1 -DKV_AFL -o "$out/shell_fuzz" fuzz/shell_fuzz.c >"$out/build.log" 2>&1; then
            cat "$out/build.log"
            fail fuzz "fuzz/shell_fuzz.c does not build with AFL++"
            return
        fi
        AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
            timeout $((FUZZ_SECONDS + 30)) afl-fuzz -V "$FUZZ_SECONDS" -i "$out/corpus" -o "$out/afl" -- "$out/shell_fuzz" >"$out/fuzz.log" 2>&1
        crashes=$(find "$out/afl" -path '*crashes/id*' 2>/dev/null | wc -l | tr -d ' ')
        hangs=$(find "$out/afl" -path '*hangs/id*' 2>/dev/null | wc -l | tr -d ' ')
        runs=$(sed -n 's/^execs_done *: *//p' "$out"/afl/*/fuzzer_stats 2>/dev/null | head -n 1)
        if [ "${runs:-0}" = 0 ]; then
            tail -n 20 "$out/fuzz.log"
            fail fuzz "AFL++ ran no input (build/check/fuzz/fuzz.log)"
        elif [ "$crashes" = 0 ] && [ "$hangs" = 0 ]; then pass fuzz "AFL++, $FUZZ_SECONDS s: $runs runs, no crash or hang"
        else fail fuzz "AFL++: $crashes crashes, $hangs hangs (build/check/fuzz/afl)"; fi
    else
        skip fuzz "neither clang's libFuzzer (Debian: libclang-rt-14-dev) nor AFL++ (afl++)"
    fi
}

check_inspect_diff() {
    have elixir || { skip inspect-diff "no elixir (Debian: elixir)"; return; }
    out=build/check/inspect-diff
    mkdir -p "$out"
    if ! cc $WARN -Wno-unused-function -O2 -o "$out/inspect_diff" tools/inspect_diff.c >"$out/build.log" 2>&1; then
        cat "$out/build.log"
        fail inspect-diff "tools/inspect_diff.c does not build"
        return
    fi
    if sh tools/inspect_diff.sh "$out" >"$out/diff.log" 2>&1; then
        pass inspect-diff "$(tail -n 1 "$out/diff.log")"
    else
        tail -n 30 "$out/diff.log"
        fail inspect-diff "kv.c prints a term differently from Elixir"
    fi
}

if [ "${1:-}" = --list ]; then echo $ALL; exit 0; fi
wanted=${*:-$ALL}
for name in $wanted; do
    case " $(echo $ALL) " in *" $name "*) ;; *) echo "check.sh: no check named $name; there are: $(echo $ALL)"; exit 2 ;; esac
done
start=$(date +%s)
for name in $wanted; do
    case $name in
    gcc-* | clang-*) check_compilers "$name" ;;
    valgrind) check_valgrind ;;
    i386) check_i386 ;;
    musl) check_musl ;;
    aarch64) check_aarch64 ;;
    chaos) check_chaos ;;
    fuzz) check_fuzz ;;
    inspect-diff) check_inspect_diff ;;
    esac
done
echo
echo "make check: $passed passed, $failed failed, $skipped skipped, in $(( $(date +%s) - start )) s${failures:+ (failed:$failures)}"
[ "$failed" = 0 ]
