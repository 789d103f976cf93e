#!/bin/sh
# inspect_diff.sh DIR [SEED] [COUNT]: kv.c's inspect beside Elixir's, on
# COUNT random terms (default 3000) from SEED (default: the time).  Needs
# DIR/inspect_diff built from tools/inspect_diff.c, and elixir.  Prints the
# first terms that differ, with both printings, or one line saying all
# agreed; exits non-zero on a difference.
set -eu
dir=$1
seed=${2:-$(date +%s)}
count=${3:-3000}
"$dir/inspect_diff" "$seed" "$count" "$dir/terms.bin" >"$dir/kv_says.txt"
# Elixir reads and writes UTF-8 only in a UTF-8 locale (C.UTF-8 is always there)
LC_ALL=C.UTF-8 elixir -e '
  [path] = System.argv()
  path |> File.read!() |> :erlang.binary_to_term() |> Enum.with_index() |> Enum.each(fn {t, i} ->
    IO.puts("### #{i}")
    IO.puts(inspect(t))
    IO.puts(inspect(t, pretty: true, width: 80))
  end)' "$dir/terms.bin" >"$dir/elixir_says.txt"
if cmp -s "$dir/kv_says.txt" "$dir/elixir_says.txt"; then
    echo "seed $seed: $count random terms, printed as Elixir prints them, by inspect/1 and pretty at 80 columns"
else
    echo "seed $seed: kv.c and Elixir differ (left kv.c, right Elixir):"
    diff "$dir/kv_says.txt" "$dir/elixir_says.txt" | head -n 40
    exit 1
fi
