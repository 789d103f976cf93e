# bench/beam.exs: the workloads of `./kv bench`, on BEAM, printing the same
# RESULT lines.  Run it as bench/compare.sh does:
#
#     elixir --erl "+S 1 +P 134217727" bench/beam.exs [NAME...]
#
# One scheduler (+S 1), as kv.c runs on one thread.  Each bench is written to
# do what its twin in kv.c (Part IX, IX.3) does, step for step; the KV
# application below is the guide's, in the form dynamic-supervisor.md leaves
# it, under names of its own.

defmodule Bench.KV.Bucket do
  use Agent, restart: :temporary

  def start_link(_opts), do: Agent.start_link(fn -> %{} end)
  def get(bucket, key), do: Agent.get(bucket, &Map.get(&1, key))
  def put(bucket, key, value), do: Agent.update(bucket, &Map.put(&1, key, value))
end

defmodule Bench.KV.Registry do
  use GenServer

  def start_link(opts), do: GenServer.start_link(__MODULE__, :ok, opts)
  def lookup(server, name), do: GenServer.call(server, {:lookup, name})
  def create(server, name), do: GenServer.cast(server, {:create, name})

  @impl true
  def init(:ok), do: {:ok, {%{}, %{}}}

  @impl true
  def handle_call({:lookup, name}, _from, {names, _refs} = state),
    do: {:reply, Map.fetch(names, name), state}

  @impl true
  def handle_cast({:create, name}, {names, refs} = state) do
    if Map.has_key?(names, name) do
      {:noreply, state}
    else
      {:ok, bucket} = DynamicSupervisor.start_child(Bench.KV.BucketSupervisor, Bench.KV.Bucket)
      ref = Process.monitor(bucket)
      {:noreply, {Map.put(names, name, bucket), Map.put(refs, ref, name)}}
    end
  end

  @impl true
  def handle_info({:DOWN, ref, :process, _pid, _reason}, {names, refs}) do
    {name, refs} = Map.pop(refs, ref)
    {:noreply, {Map.delete(names, name), refs}}
  end

  def handle_info(_msg, state), do: {:noreply, state}
end

defmodule Bench.KV.Supervisor do
  use Supervisor

  def start_link(opts), do: Supervisor.start_link(__MODULE__, :ok, opts)

  @impl true
  def init(:ok) do
    Supervisor.init(
      [
        {DynamicSupervisor, name: Bench.KV.BucketSupervisor, strategy: :one_for_one},
        {Bench.KV.Registry, name: Bench.KV.Registry}
      ],
      strategy: :one_for_all
    )
  end
end

defmodule Bench.Server do
  use GenServer
  @impl true
  def init(arg), do: {:ok, arg}
  @impl true
  def handle_call(request, _from, state), do: {:reply, request, state}
end

defmodule Bench do
  import Bitwise

  def result(bench, metric, value, unit),
    do: IO.puts("RESULT\t#{bench}\t#{metric}\t#{:erlang.float_to_binary(value / 1, decimals: 1)}\t#{unit}")

  defp now, do: System.monotonic_time(:nanosecond)
  defp since(t0), do: now() - t0

  # The generator kv.c draws from: the same 31-bit linear congruential one.
  def next(x), do: (x * 1_103_515_245 + 12345) &&& 0x7FFFFFFF

  # Each bench runs in a process of its own, as in kv.c.
  def run(fun) do
    {pid, ref} = spawn_monitor(fun)
    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end
  end

  # ---- switch, ring, spawn ----

  # BEAM has no bare switch to time; the nearest is a process yielding to
  # itself, which is one trip through the scheduler.
  def switch do
    n = 20_000_000
    t0 = now()
    yield_loop(n)
    result("switch", "ns_per_switch", since(t0) / n, "ns")
  end

  defp yield_loop(0), do: :ok
  defp yield_loop(n), do: (:erlang.yield(); yield_loop(n - 1))

  def ring(n, hops) do
    parent = self()
    members = for _ <- 1..n, do: spawn(fn -> ring_member() end)
    [first | _] = members
    Enum.zip(members, tl(members) ++ [first])
    |> Enum.each(fn {m, next} -> send(m, {next, parent}) end)
    t0 = now()
    send(first, hops)
    receive do
      :ok -> :ok
    end
    result("ring_n#{n}", "ns_per_hop", since(t0) / hops, "ns")
    Enum.each(members, &Process.exit(&1, :kill))
  end

  defp ring_member do
    receive do
      {next, main} -> ring_loop(next, main)
    end
  end

  defp ring_loop(next, main) do
    receive do
      0 -> send(main, :ok)
      left -> (send(next, left - 1); ring_loop(next, main))
    end
  end

  def spawn_bench(n) do
    t0 = now()
    spawn_loop(n)
    result("spawn", "ns_per_spawn", since(t0) / n, "ns")
  end

  defp spawn_loop(0), do: :ok

  defp spawn_loop(n) do
    {pid, ref} = spawn_monitor(fn -> :ok end)
    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end
    spawn_loop(n - 1)
  end

  # ---- bulk, idle, max_live ----

  defp peak_rss_reset, do: File.write("/proc/self/clear_refs", "5")

  defp rss do
    case File.read("/proc/self/statm") do
      {:ok, text} ->
        [_size, resident | _] = String.split(text)
        String.to_integer(resident) * 4096
      _ -> 0
    end
  end

  defp peak_rss do
    {:ok, text} = File.read("/proc/self/status")
    [kib] = Regex.run(~r/VmHWM:\s+(\d+) kB/, text, capture: :all_but_first)
    String.to_integer(kib) * 1024
  end

  def bulk(n) do
    parent = self()
    peak_rss_reset()
    rss0 = rss()
    t0 = now()
    pids = for _ <- 1..n, do: spawn(fn -> receive do _ -> send(parent, :ok) end end)
    result("bulk", "ns_per_spawn", since(t0) / n, "ns")
    t0 = now()
    Enum.each(pids, &send(&1, :ok))
    for _ <- 1..n, do: (receive do :ok -> :ok end)
    result("bulk", "ns_per_release", since(t0) / n, "ns")
    result("bulk", "peak_rss_bytes", peak_rss() - rss0, "bytes")
  end

  def idle(n, name) do
    mem0 = :erlang.memory(:processes)
    rss0 = rss()
    pids = for _ <- 1..n, do: spawn(fn -> receive do _ -> :ok end end)
    :erlang.yield()
    result(name, "bytes_per_process", (:erlang.memory(:processes) - mem0) / n, "bytes")
    result(name, "rss_bytes_per_process", (rss() - rss0) / n, "bytes")
    Enum.each(pids, &Process.exit(&1, :kill))
  end

  def max_live do
    budget = min(4 * 1024 * 1024 * 1024, div(total_memory(), 4))
    rss0 = rss()
    pids = max_live_loop(rss0, budget, [])
    result("max_live", "processes", length(pids), "processes")
    result("max_live", "budget_mib", div(budget, 1024 * 1024), "MiB")
    Enum.each(pids, &Process.exit(&1, :kill))
  end

  defp total_memory do
    {:ok, text} = File.read("/proc/meminfo")
    [kib] = Regex.run(~r/MemTotal:\s+(\d+) kB/, text, capture: :all_but_first)
    String.to_integer(kib) * 1024
  end

  defp max_live_loop(rss0, budget, pids) do
    if rss() - rss0 >= budget do
      pids
    else
      more = for _ <- 1..65536, do: spawn(fn -> receive do _ -> :ok end end)
      max_live_loop(rss0, budget, more ++ pids)
    end
  end

  # ---- call, agent ----

  def call(n) do
    {:ok, server} = GenServer.start_link(Bench.Server, nil)
    t0 = now()
    call_loop(server, n)
    result("call", "ns_per_call", since(t0) / n, "ns")
  end

  defp call_loop(_server, 0), do: :ok
  defp call_loop(server, n), do: (GenServer.call(server, :ok); call_loop(server, n - 1))

  def agent(n) do
    {:ok, agent} = Agent.start_link(fn -> 0 end)
    t0 = now()
    get_loop(agent, n)
    result("agent", "ns_per_get", since(t0) / n, "ns")
    t0 = now()
    update_loop(agent, n)
    result("agent", "ns_per_update", since(t0) / n, "ns")
  end

  defp get_loop(_agent, 0), do: :ok
  defp get_loop(agent, n), do: (Agent.get(agent, fn s -> s end); get_loop(agent, n - 1))
  defp update_loop(_agent, 0), do: :ok
  defp update_loop(agent, n), do: (Agent.update(agent, fn s -> s + 1 end); update_loop(agent, n - 1))

  # ---- kv ----

  @ops 1_000_000
  @kills 1000
  @keys 16

  def kv(n) do
    {:ok, sup} = Bench.KV.Supervisor.start_link([])
    registry = Bench.KV.Registry
    names = List.to_tuple(for i <- 0..(n - 1), do: "bucket#{i}")
    keys = List.to_tuple(for i <- 0..(@keys - 1), do: "key#{i}")
    bench = "kv_#{div(n, 1000)}k"

    t0 = now()
    for i <- 0..(n - 1), do: Bench.KV.Registry.create(registry, elem(names, i))
    {:ok, _} = Bench.KV.Registry.lookup(registry, elem(names, n - 1))
    result(bench, "create_ms", since(t0) / 1.0e6, "ms")

    t0 = now()
    ops_loop(registry, names, keys, n, 0, 42)
    ns = since(t0)
    result(bench, "ops_ms", ns / 1.0e6, "ms")
    result(bench, "kops_per_s", @ops / (ns / 1.0e9) / 1000, "kops/s")

    t0 = now()
    for i <- 0..(@kills - 1) do
      {:ok, bucket} = Bench.KV.Registry.lookup(registry, elem(names, i))
      Process.exit(bucket, :kill)
    end
    for i <- 0..(@kills - 1), do: wait_forgotten(registry, elem(names, i))
    result(bench, "kill_1000_ms", since(t0) / 1.0e6, "ms")
    Supervisor.stop(sup)
  end

  defp ops_loop(_registry, _names, _keys, _n, @ops, _x), do: :ok

  defp ops_loop(registry, names, keys, n, i, x) do
    x = next(x)
    {:ok, bucket} = Bench.KV.Registry.lookup(registry, elem(names, rem(x, n)))
    key = elem(keys, rem(i, @keys))
    if rem(i, 2) == 0, do: Bench.KV.Bucket.put(bucket, key, i), else: Bench.KV.Bucket.get(bucket, key)
    ops_loop(registry, names, keys, n, i + 1, x)
  end

  defp wait_forgotten(registry, name) do
    case Bench.KV.Registry.lookup(registry, name) do
      :error -> :ok
      {:ok, _} -> (:erlang.yield(); wait_forgotten(registry, name))
    end
  end

  # ---- restart ----

  @restarts 10000

  def restart do
    child = %{id: :child, start: {Agent, :start_link, [fn -> 0 end, [name: :bench_child]]}}
    {:ok, sup} = Supervisor.start_link([child], strategy: :one_for_one, max_restarts: 1_000_000)
    us = for _ <- 1..@restarts, do: restart_once()
    first = Enum.take(us, 100)
    last = Enum.take(us, -1000)
    result("restart", "first_100_us", Enum.sum(first) / 100, "us")
    result("restart", "last_1000_us", Enum.sum(last) / 1000, "us")
    Supervisor.stop(sup)
  end

  defp restart_once do
    old = Process.whereis(:bench_child)
    t0 = now()
    Process.exit(old, :kill)
    wait_new(old)
    since(t0) / 1000
  end

  defp wait_new(old) do
    case Process.whereis(:bench_child) do
      pid when pid == nil or pid == old -> (:erlang.yield(); wait_new(old))
      _ -> :ok
    end
  end

  # ---- the list ----

  def benches do
    [
      {"switch", fn -> switch() end},
      {"ring", fn -> ring(1000, 10_000_000); ring(100_000, 10_000_000) end},
      {"spawn", fn -> spawn_bench(1_000_000) end},
      {"bulk", fn -> bulk(1_000_000) end},
      {"idle", fn -> idle(100_000, "idle_100k"); idle(1_000_000, "idle_1m") end},
      {"max_live", fn -> max_live() end},
      {"call", fn -> call(1_000_000) end},
      {"agent", fn -> agent(1_000_000) end},
      {"kv", fn -> kv(10_000); kv(100_000) end},
      {"restart", fn -> restart() end}
    ]
  end

  def main(args) do
    known = Enum.map(benches(), &elem(&1, 0))
    Enum.each(args, fn a -> a in known or raise "no bench named #{a}; there are: #{Enum.join(known, " ")}" end)
    for {name, fun} <- benches(), args == [] or name in args, do: run(fun)
  end
end

Logger.configure(level: :warning)
Bench.main(System.argv())
