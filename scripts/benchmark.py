"""Speed and memory of the engine's design choices, each measured side by side with the naive way.

    python scripts/benchmark.py                 # align, exchange, memory: about a minute on 2 CPU cores
    python scripts/benchmark.py --only exchange --repeats 50
    python scripts/benchmark.py --only scale    # whole runs against the number of peers: about 15 minutes
    python scripts/benchmark.py --only prefix --repeats 5   # LoRA on the top blocks, with and without the cache
    python scripts/benchmark.py --only secret --repeats 3   # toy runs on 2 processes without and with the secret
    python scripts/benchmark.py --only sweep --repeats 5    # a sweep's runs: new Python each, or forked

- align:    one batched soft-Procrustes call over all modules vs one call per module;
- exchange: one message per process pair (this project's transport) vs one message per peer-to-peer
            route, on 2 real Gloo processes over loopback;
- wire:     one ring gossip step of a 1M-float payload (framed, screened) against an all_reduce of
            the same tensor, one peer per Gloo process over loopback, 4 and 8 processes; also per
            byte moved (a ring step sends 2 payloads per process, a ring all_reduce 2 (P-1) / P);
- memory:   N peers sharing one frozen base model in a process vs one model copy per peer
            (resident memory of a fresh process each);
- scale:    whole `p2p-fedrot run` commands in one process against the number of hosted peers (toy
            MLP and the packaged MiniLM), all peers in one forward (batch_peers: true) against one
            at a time: command time, median round time and peak resident memory, as a table and
            docs/scale.png. On a machine with a GPU the runs use it.
- prefix:   the packaged MiniLM hosting 16 peers on health tweets: one local step of every peer and
            one evaluation of every peer on the shared test set, with LoRA on all blocks, on the top
            2 blocks, and on the top 2 with the frozen-prefix cache (filled once beforehand, timed apart).
- secret:   whole toy runs (configs/toy.yaml, 2 processes under torchrun, one thread each) without
            and with P2P_FEDROT_SECRET, alternating: command time, run time and the time spent in the
            exchange; how fast one frame MAC (HMAC-SHA256) reads a 1M-float payload; and the gossip
            step of the exchange benchmark without and with frame MACs (ring and complete).
- sweep:    the runs of a sweep (configs/robust.yaml: 16 toy peers, 20 rounds), one at a time, each
            a new Python process (`python -m p2p_fedrot run`) against each forked from the sweep's
            server that has imported torch and peft once; alternating, time per run to its exit.

Prints medians over ``--repeats`` and their ratios. Figures depend on the machine: compare ratios.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from p2p_fedrot.comm.auth import SECRET_VARIABLE, FrameKey
from p2p_fedrot.methods.procrustes import align_modules, align_pair
from p2p_fedrot.config import DataConfig, LoraSettings, ModelConfig, TrainConfig
from p2p_fedrot.data.federated import build_data
from p2p_fedrot.comm.routes import collect_mix_inputs, routes_of
from p2p_fedrot.graph.weights import mixing_matrix
from p2p_fedrot.peers.models import build_bank, load_tokenizer
from p2p_fedrot.comm.runtime import Runtime, init_runtime
from p2p_fedrot.peers.training import BankTrainer, evaluate, peers_per_forward
from p2p_fedrot.graph.topologies import build_topology
from p2p_fedrot.comm.transport import Placement, Transport
from p2p_fedrot.study.sweep import ForkedRun, command, fork_server, plan, run_arguments

# (label, modules, r, d_in, d_out): LoRA on query/value of the packaged MiniLM, and on q/v of a
# 30-layer decoder of SmolLM2-135M's widths (v is narrower there, but the SVDs are r x r either way).
ALIGN_CASES = [("MiniLM q,v r=8", 12, 8, 384, 384), ("SmolLM2-135M q,v r=16", 60, 16, 576, 576)]
EXCHANGE_PEERS, EXCHANGE_NUMEL = 16, 75_653  # one MiniLM fedit payload (r=8 on q,v + 5-class head)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_align(repeats: int) -> None:
    print("align: one batched soft_rotation for all modules vs align_pair module by module (lam=0.4, side A)")
    for label, modules, r, d_in, d_out in ALIGN_CASES:
        g = torch.Generator().manual_seed(0)
        As = [torch.randn(r, d_in, generator=g) for _ in range(modules)]
        Bs = [torch.randn(d_out, r, generator=g) for _ in range(modules)]
        refs = [torch.randn(r, d_in, generator=g) for _ in range(modules)]
        batched = median_seconds(lambda: align_modules(As, Bs, refs, "A", 0.4), repeats)
        looped = median_seconds(lambda: [align_pair(a, b, ref, None, "A", 0.4) for a, b, ref in zip(As, Bs, refs)],
                                repeats)
        print(f"  {label:<24} batched {batched * 1e3:8.2f} ms | per module {looped * 1e3:8.2f} ms"
              f" | per-module / batched {looped / batched:5.2f}x")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world: int, port: int) -> Runtime:
    """Join a Gloo group of ``world`` processes on loopback, one thread each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    return init_runtime("gloo", timeout_s=120)


def _naive_exchange(placement: Placement, routes: list[tuple[int, int]], payloads: dict[int, torch.Tensor]) -> int:
    """One isend/irecv per cross-process route, as if every peer were its own rank."""
    local = set(placement.local_peers)
    ops, sent = [], 0
    for src, dst in sorted(routes):
        if src in local and dst not in local:
            ops.append(dist.P2POp(dist.isend, payloads[src], placement.owner(dst)))
            sent += payloads[src].numel() * payloads[src].element_size()
        elif dst in local and src not in local:
            ops.append(dist.P2POp(dist.irecv, torch.empty(EXCHANGE_NUMEL), placement.owner(src)))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return sent


def _exchange_worker(rank: int, world: int, port: int, topologies: list[str], repeats: int, results: dict) -> None:
    """Both exchanges on each graph in turn, in one process group (a group per graph would start
    Python and torch again for every graph)."""
    runtime = _join(rank, world, port)
    placement = Placement(EXCHANGE_PEERS, world, rank)
    transport = Transport(placement, runtime.device, 120)
    payloads = {p: torch.randn(EXCHANGE_NUMEL) for p in placement.local_peers}
    for topology in topologies:
        W = mixing_matrix(build_topology(topology, EXCHANGE_PEERS, seed=0).graph_at(0))
        routes = routes_of(W)

        def ours() -> None:
            dist.barrier()
            collect_mix_inputs(transport, W, payloads)

        def naive() -> None:
            dist.barrier()
            _naive_exchange(placement, routes, payloads)

        before = transport.wire_bytes
        collect_mix_inputs(transport, W, payloads)
        ours_bytes = transport.wire_bytes - before
        naive_bytes = _naive_exchange(placement, routes, payloads)
        ours_s, naive_s = median_seconds(ours, repeats), median_seconds(naive, repeats)
        if rank == 0:
            results[topology] = (ours_s, naive_s, ours_bytes, naive_bytes)
    dist.destroy_process_group()


def bench_exchange(repeats: int) -> None:
    print(f"exchange: {EXCHANGE_PEERS} peers on 2 Gloo processes, payload {EXCHANGE_NUMEL * 4:,} B per peer;"
          " one message per process pair vs one per route")
    topologies = ["ring", "torus", "exponential", "complete"]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_exchange_worker, args=(2, _free_port(), topologies, repeats, results), nprocs=2)
        results = dict(results)
    for topology in topologies:
        ours_s, naive_s, ours_bytes, naive_bytes = results[topology]
        print(f"  {topology:<12} one per pair {ours_s * 1e3:7.2f} ms, {ours_bytes / 1e6:5.2f} MB out of process 0"
              f" | one per route {naive_s * 1e3:7.2f} ms, {naive_bytes / 1e6:5.2f} MB"
              f" | time ratio {naive_s / ours_s:5.2f}x")


WIRE_NUMEL = 1_000_000


def _wire_worker(rank: int, world: int, port: int, repeats: int, results: dict) -> None:
    runtime = _join(rank, world, port)
    transport = Transport(Placement(world, world, rank), runtime.device, 120)
    W = mixing_matrix(build_topology("ring", world, seed=0).graph_at(0))
    payloads = {rank: torch.randn(WIRE_NUMEL, generator=torch.Generator().manual_seed(rank))}
    tensor = torch.randn(WIRE_NUMEL)

    def gossip() -> None:
        dist.barrier()
        collect_mix_inputs(transport, W, payloads)

    def all_reduce() -> None:
        dist.barrier()
        dist.all_reduce(tensor)

    gossip_s, reduce_s = median_seconds(gossip, repeats), median_seconds(all_reduce, repeats)
    if rank == 0:
        results[world] = (gossip_s, reduce_s)
    runtime.heartbeat.stop()
    dist.destroy_process_group()


def bench_wire(repeats: int) -> None:
    print(f"wire: one ring gossip step vs all_reduce of {WIRE_NUMEL:,} floats, one peer per Gloo process")
    for world in (4, 8):
        port = _free_port()
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_wire_worker, args=(world, port, repeats, results), nprocs=world)
            gossip_s, reduce_s = results[world]
        per_byte = (gossip_s / 2) / (reduce_s / (2 * (world - 1) / world))
        print(f"  P={world}  ring step {gossip_s * 1e3:7.2f} ms | all_reduce {reduce_s * 1e3:7.2f} ms"
              f" | ratio {gossip_s / reduce_s:5.2f}x, per byte moved {per_byte:5.2f}x")


def _resident_mb() -> float:
    """Current resident memory of this process (Linux), after freeing what loading left behind."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(peers: int, copies: bool) -> None:
    """Print the resident MB while hosting ``peers`` adapters: one shared base, or a deep copy per peer."""
    config = ModelConfig(name="packaged:minilm")
    if copies:
        models = [build_bank(config, [0], 0, 5, 0, torch.device("cpu")).model]
        models += [copy.deepcopy(models[0]) for _ in range(peers - 1)]
    else:
        models = [build_bank(config, list(range(peers)), 0, 5, 0, torch.device("cpu")).model]
    print(f"{_resident_mb():.1f} {len(models)}")


def bench_memory(peers: int) -> None:
    print(f"memory: packaged MiniLM, resident MB of a fresh process hosting 1 or {peers} peers")

    def measure(n: int, copies: bool) -> float:
        code = f"from benchmark import _memory_child; _memory_child({n}, {copies})"
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)), HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return float(done.stdout.split()[-2])

    one = measure(1, False)
    shared, copied = measure(peers, False), measure(peers, True)
    print(f"  1 peer {one:7.1f} MB | {peers} peers sharing one base {shared:7.1f} MB (+{shared - one:.1f})"
          f" | {peers} peers with a model each {copied:7.1f} MB (+{copied - one:.1f})")


SCALE_CASES = {  # model: (peers to host, peers per forward when batched, overrides of its config)
    "toy": ((16, 64, 256, 1024, 4096), "true", ("topology=ring", "rounds=3", "train.local_steps=1",
                                                "data.partition=iid")),
    # at most 8 MiniLM peers per forward: a joint forward holds every peer's activations (32 peers: 10 GB)
    "minilm": ((2, 8, 32, 64), "8", ("topology=ring", "rounds=2", "train.local_steps=2", "train.batch_size=16",
                                     "data.partition=iid", "data.test_samples=64", "model.max_length=64")),
}
SCALE_THREADS = 2
SCALE_CONFIGS = {"toy": "configs/toy.yaml", "minilm": "configs/demo.yaml"}
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _scale_run(model: str, peers: int, batched: bool, folder: str) -> dict:
    """One whole command in a fresh process: its wall time, median round time (training and mixing,
    evaluation apart) and peak resident memory."""
    _, per_forward, settings = SCALE_CASES[model]
    overrides = [*settings, f"peers={peers}", f"train.batch_peers={per_forward if batched else 'false'}",
                 f"out={folder}", f"threads={SCALE_THREADS}"]
    overrides.append(f"data.train_samples={32 * peers}")  # 32 examples per peer
    command = [sys.executable, "-m", "p2p_fedrot", "run", SCALE_CONFIGS[model], "--overwrite"]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{model} with {peers} peers failed: {process.stderr.read()[-2000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as lines:
        records = [json.loads(line) for line in lines]
    rounds = [sum(r["seconds"][k] for k in ("train", "align", "exchange")) for r in records]
    evals = [r["seconds"]["eval"] for r in records]
    return {"model": model, "peers": peers, "batched": batched, "command_s": wall,
            "round_s": statistics.median(rounds), "eval_s": statistics.median(evals),
            "peak_mb": usage.ru_maxrss / 1024}


def bench_scale(models: list[str], one_by_one_limit: int) -> None:
    """Every case of SCALE_CASES, both modes (one at a time only up to ``one_by_one_limit`` peers)."""
    print("scale: whole runs in one process; round = train + align + mix (median), eval apart; peak RSS;")
    print("  batched = " + ", ".join(f"{m}: {'all' if SCALE_CASES[m][1] == 'true' else SCALE_CASES[m][1]} peers per forward"
                                     for m in models))
    print(f"  {'model':<7} {'peers':>6} {'mode':<11} {'command s':>9} {'round s':>8} {'eval s':>7} {'peak MB':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            for peers in SCALE_CASES[model][0]:
                for batched in (True, False):
                    if not batched and peers > one_by_one_limit:
                        continue
                    row = _scale_run(model, peers, batched, os.path.join(scratch, f"{model}-{peers}-{batched}"))
                    rows.append(row)
                    mode = "batched" if batched else "one by one"
                    print(f"  {model:<7} {peers:>6} {mode:<11} {row['command_s']:9.1f} {row['round_s']:8.3f}"
                          f" {row['eval_s']:7.2f} {row['peak_mb']:8.0f}", flush=True)
    for model in models:
        for batched in (True, False):
            times = {r["peers"]: r["round_s"] for r in rows if r["model"] == model and r["batched"] == batched}
            pairs = [(a, b) for a, b in zip(sorted(times), sorted(times)[1:])]
            growth = ", ".join(f"t({b})/t({a}) = {times[b] / times[a]:.2f}" for a, b in pairs)
            if growth:
                print(f"  {model} {'batched' if batched else 'one by one'}: {growth}")
        for peers in SCALE_CASES[model][0]:
            pair = {r["batched"]: r["round_s"] for r in rows if r["model"] == model and r["peers"] == peers}
            if len(pair) == 2:
                print(f"  {model} {peers} peers: one by one / batched round time = {pair[False] / pair[True]:.2f}")
    _plot_scale(rows, os.path.join(DOCS, "scale.png"))


def _plot_scale(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in rows}):
        for batched, style in ((True, "-o"), (False, "--s")):
            chosen = sorted((r for r in rows if r["model"] == model and r["batched"] == batched), key=lambda r: r["peers"])
            if not chosen:
                continue
            label = f"{model}, {'batched' if batched else 'one by one'}"
            peers = [r["peers"] for r in chosen]
            times.plot(peers, [r["round_s"] for r in chosen], style, label=label)
            memory.plot(peers, [r["peak_mb"] for r in chosen], style, label=label)
    for axis, title in ((times, "round time (s, median)"), (memory, "peak resident memory (MB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("peers hosted in one process")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    times.legend()
    device = "GPU" if torch.cuda.is_available() else f"CPU, {SCALE_THREADS} threads"
    figure.suptitle(f"p2p-fedrot run in one process ({device})")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"  plot: {path}")


PREFIX_PEERS = 16
PREFIX_CASES = {"all blocks": ("all", False), "top 2": ({"top": 2}, False), "top 2 + cache": ({"top": 2}, "auto")}


def _prefix_case(layers, cache, data, repeats: int) -> dict:
    """Median seconds of one local step of all peers and of one evaluation of all of them."""
    config = ModelConfig(name="packaged:minilm", max_length=64, lora=LoraSettings(layers=layers))
    peers = list(range(PREFIX_PEERS))
    bank = build_bank(config, peers, 0, data.num_classes, 0, torch.device("cpu"))
    train = TrainConfig(local_steps=1, batch_size=16, optimizer="adamw", lr=0.001, prefix_cache=cache)
    group = peers_per_forward("auto", bank, data.test, train.batch_size)
    trainer = BankTrainer(bank, {p: data.clients[p].train for p in peers}, train, 0, group=group)
    fill = 0.0
    if bank.prefix is not None:
        start = time.perf_counter()
        bank.prefix.hidden(torch.arange(len(bank.prefix.corpus)), 1)
        fill = time.perf_counter() - start
    rounds = iter(range(10**6))
    step = median_seconds(lambda: trainer.train(next(rounds), peers, frozenset({"A", "B", "head"})), repeats)
    scoring = median_seconds(lambda: evaluate(bank, {p: data.test for p in peers}, 64, group=group), repeats, 0)
    return {"step": step, "eval": scoring, "fill": fill, "group": group}


def bench_prefix(repeats: int) -> None:
    print(f"prefix: packaged MiniLM, {PREFIX_PEERS} hosted peers, health tweets (max_length 64, padded per batch):"
          " one local step of every peer (batch 16) and one evaluation of every peer (test set of 64)")
    data = build_data(DataConfig(name="packaged:health_tweets", partition="iid", train_samples=32 * PREFIX_PEERS,
                                 test_samples=64), list(range(PREFIX_PEERS)), 0,
                      load_tokenizer(ModelConfig(name="packaged:minilm")), 64)
    rows = {label: _prefix_case(layers, cache, data, repeats) for label, (layers, cache) in PREFIX_CASES.items()}
    base = rows["all blocks"]
    for label, row in rows.items():
        fill = f" | cache filled once in {row['fill']:.2f} s" if row["fill"] else ""
        print(f"  {label:<14} step {row['step']:7.3f} s (all blocks / this {base['step'] / row['step']:4.2f}x)"
              f" | eval {row['eval']:7.3f} s ({base['eval'] / row['eval']:4.2f}x){fill}"
              f" | {row['group']} peer(s) per forward")


def _secret_run(folder: str, secret: str | None) -> dict:
    """One toy run on 2 processes under torchrun, with ``secret`` as the launch secret or none: its
    command time, the run's own time (start-up aside) and its time in the exchange."""
    env = {key: value for key, value in os.environ.items() if key != SECRET_VARIABLE}
    env.update({SECRET_VARIABLE: secret} if secret else {})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "p2p_fedrot", "run", SCALE_CONFIGS["toy"], "--overwrite", "--set", f"out={folder}", "--set", "threads=1"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    with open(os.path.join(folder, "metrics.jsonl")) as lines:
        exchange = sum(json.loads(line)["seconds"]["exchange"] for line in lines)
    with open(os.path.join(folder, "summary.json")) as summary:
        return {"command_s": wall, "run_s": json.load(summary)["wall_time_s"], "exchange_s": exchange}


def _sealed_worker(rank: int, world: int, port: int, topology: str, repeats: int, results: dict) -> None:
    """One gossip step of the exchange benchmark's payloads, without and with frame MACs."""
    runtime = _join(rank, world, port)
    placement = Placement(EXCHANGE_PEERS, world, rank)
    plain = Transport(placement, runtime.device, 120)
    sealed = Transport(placement, runtime.device, 120, key=FrameKey(bytes(32)))  # the same key on both ends
    W = mixing_matrix(build_topology(topology, EXCHANGE_PEERS, seed=0).graph_at(0))
    payloads = {p: torch.randn(EXCHANGE_NUMEL) for p in placement.local_peers}

    def step(transport: Transport) -> None:
        dist.barrier()
        collect_mix_inputs(transport, W, payloads)

    times = (median_seconds(lambda: step(plain), repeats), median_seconds(lambda: step(sealed), repeats))
    if rank == 0:
        results[topology] = times
    runtime.heartbeat.stop()
    dist.destroy_process_group()


def bench_secret(repeats: int) -> None:
    print("secret: toy runs (20 rounds, 8 peers) on 2 Gloo processes under torchrun, without and with the "
          "launch secret, alternating")
    secret, runs = secrets.token_hex(32), {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            for sealed in (False, True):
                runs[sealed].append(_secret_run(folder, secret if sealed else None))
    for sealed in (False, True):
        medians = {key: statistics.median(run[key] for run in runs[sealed]) for key in runs[sealed][0]}
        each = ", ".join(f"{run['command_s']:.2f}" for run in runs[sealed])
        print(f"  {'with' if sealed else 'without':<8} command {medians['command_s']:6.2f} s | run "
              f"{medians['run_s']:6.2f} s | exchange {medians['exchange_s']:6.3f} s "
              f"(commands {each} s)")
    payload = torch.randn(WIRE_NUMEL)
    seconds = median_seconds(lambda: FrameKey(bytes(32)).mac(b"", [payload]), repeats)
    print(f"  one frame MAC over {WIRE_NUMEL:,} floats: {seconds * 1e3:.2f} ms, "
          f"{WIRE_NUMEL * 4 / seconds / 1e9:.2f} GB/s")
    print(f"  one gossip step, {EXCHANGE_PEERS} peers on 2 Gloo processes, payload {EXCHANGE_NUMEL * 4:,} B per peer:")
    for topology in ("ring", "complete"):
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_sealed_worker, args=(2, _free_port(), topology, max(repeats, 30), results), nprocs=2)
            plain_s, sealed_s = results[topology]
        print(f"    {topology:<9} without {plain_s * 1e3:6.2f} ms | with {sealed_s * 1e3:6.2f} ms | "
              f"ratio {sealed_s / plain_s:5.2f}x")


def bench_sweep(repeats: int) -> None:
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "robust.yaml")
    print("sweep: runs of configs/robust.yaml (16 toy peers, 20 rounds, one thread), one at a time, alternating")
    server, times = fork_server(), {"new process": [], "forked": []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(repeats):
            for mode in times:
                out = os.path.join(folder, mode.replace(" ", "_"))
                run = plan(config, [], [seed], Path(out), ["threads=1"])[0]
                log = run.folder.parent / f"seed{seed}.log"
                run.folder.parent.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                if mode == "forked":
                    ForkedRun(server, run_arguments(run, config, None), log).wait()
                else:
                    with open(log, "w") as output:
                        subprocess.run(command(run, config, 1, None), stdout=output, stderr=subprocess.STDOUT, check=True)
                times[mode].append(time.perf_counter() - start)
    fresh, forked = (statistics.median(times[mode]) for mode in times)
    print(f"  new process {fresh:6.2f} s per run | forked {forked:6.2f} s per run | ratio {fresh / forked:5.2f}x "
          f"(the first forked run also waits for the server's imports: "
          f"{', '.join(f'{t:.2f}' for t in times['forked'])} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["align", "exchange", "wire", "memory", "scale", "prefix", "secret", "sweep"],
                        action="append",
                        help="run only these benchmarks (repeatable)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per measurement (median)")
    parser.add_argument("--peers", type=int, default=8, help="peers hosted in the memory benchmark")
    parser.add_argument("--models", nargs="+", default=list(SCALE_CASES), choices=list(SCALE_CASES),
                        help="models of the scale benchmark")
    parser.add_argument("--one-by-one-limit", type=int, default=1024,
                        help="largest peer count the scale benchmark also runs one peer at a time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = args.only or ["align", "exchange", "wire", "memory"]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, medians of {args.repeats} repeats")
    if "align" in chosen:
        bench_align(args.repeats)
    if "exchange" in chosen:
        bench_exchange(args.repeats)
    if "wire" in chosen:
        bench_wire(args.repeats)
    if "memory" in chosen:
        bench_memory(args.peers)
    if "scale" in (args.only or []):
        bench_scale(args.models, args.one_by_one_limit)
    if "prefix" in (args.only or []):
        bench_prefix(args.repeats)
    if "secret" in (args.only or []):
        bench_secret(args.repeats)
    if "sweep" in (args.only or []):
        bench_sweep(args.repeats)


if __name__ == "__main__":
    main()
