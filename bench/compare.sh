#!/bin/sh
# bench/compare.sh [-r ROUNDS] [NAME...]: kv.c's figures beside BEAM's.
#
# Runs `./kv bench` and bench/beam.exs (BEAM with one scheduler, +S 1) in
# turn, ROUNDS times (default 3), the order alternating from round to
# round, with the same bench names (default: all of them), and prints a
# table of each figure's median on both sides.  The last column says how
# many times better kv.c does: BEAM/kv.c for a time or a size, kv.c/BEAM
# for a rate or a count; above 1, kv.c is ahead.  Without erl and elixir
# (Debian's `elixir` package), it says so and prints kv.c's figures alone.
# Nothing here is needed to build or test kv.c.
set -eu
cd "$(dirname "$0")/.."

rounds=3
if [ "${1:-}" = "-r" ]; then rounds=$2; shift 2; fi

make -s kv
beam=yes
command -v elixir >/dev/null 2>&1 && command -v erl >/dev/null 2>&1 || beam=no

out=$(mktemp -d "${TMPDIR:-/tmp}/compare.XXXXXX")
trap 'rm -rf "$out"' EXIT

run_kv() { ./kv bench "$@" >>"$out/kv"; }
run_beam() { elixir --erl "+S 1 +P 134217727" bench/beam.exs "$@" >>"$out/beam"; }

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
echo "$(uname -sm), $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')"
[ $beam = yes ] && echo "BEAM: $(erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().') (OTP), $(elixir --version | tail -n 1)"
: >"$out/kv"
: >"$out/beam"
r=1
while [ $r -le "$rounds" ]; do
    echo "round $r of $rounds" >&2
    if [ $beam = yes ] && [ $((r % 2)) = 0 ]; then run_beam "$@"; run_kv "$@"
    elif [ $beam = yes ]; then run_kv "$@"; run_beam "$@"
    else run_kv "$@"; fi
    r=$((r + 1))
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
echo

# The medians, side by side, in the order kv.c printed its figures.
awk -F'\t' -v beam=$beam '
    function median(list,    n, v, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function show(x) { return x >= 100 ? sprintf("%.0f", x) : sprintf("%.1f", x) }
    FNR == 1 { side = FILENAME ~ /beam$/ ? "beam" : "kv" }
    $1 == "RESULT" && $3 != "budget_mib" {
        key = $2 " " $3
        if (!(key in unit)) { order[++n] = key; unit[key] = $5 }
        values[side, key] = values[side, key] " " $4
    }
    END {
        if (beam == "yes") {
            printf "| figure | unit | BEAM | kv.c | kv.c ahead by |\n| --- | --- | --- | --- | --- |\n"
        } else {
            print "(erl and elixir are not installed: kv.c alone)"
            printf "| figure | unit | kv.c |\n| --- | --- | --- |\n"
        }
        for (i = 1; i <= n; i++) {
            key = order[i]
            k = median(values["kv", key])
            if (beam != "yes") { printf "| %s | %s | %s |\n", key, unit[key], show(k); continue }
            if (!(("beam", key) in values)) { printf "| %s | %s | - | %s | |\n", key, unit[key], show(k); continue }
            b = median(values["beam", key])
            higher_better = unit[key] ~ /\/s$/ || unit[key] == "processes"
            ratio = higher_better ? (b ? k / b : 0) : (k ? b / k : 0)
            printf "| %s | %s | %s | %s | %.2f |\n", key, unit[key], show(b), show(k), ratio
        }
    }' "$out/kv" "$out/beam"
