"""Command line: ``p2p-fedrot run CONFIG``, ``sweep CONFIG --grid ...``, ``topology SPEC``, ``report RUN...``.

Errors a user can fix are printed as one line naming the problem and the fix, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Sequence

import yaml

from .errors import ConfigError, P2PFedRotError, PeerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-fedrot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment (alone, or one process of a torchrun launch)")
    run.add_argument("config", help="YAML config file, e.g. configs/toy.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set topology=torus --set train.lr=0.05 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="require the checkpoint in the run's out folder and go on from it (same as --set "
                          "resume=true; by default, resume: auto goes on from it when there is one)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the outputs of another run in out (same as --set overwrite=true)")

    topo = sub.add_parser("topology", help="describe a communication graph and its mixing matrix")
    topo.add_argument("spec", help="catalogue name (ring, torus, ...), topology YAML, graph file, "
                      "or a mapping such as '{name: erdos_renyi, p: 0.2}'")
    topo.add_argument("--peers", type=int, required=True, help="number of peers (graph nodes)")
    topo.add_argument("--mixing", default="metropolis", help="metropolis | uniform | max_degree")
    topo.add_argument("--seed", type=int, default=0, help="seed for random graphs")
    topo.add_argument("--round", type=int, default=0, help="round to show for time-varying schedules")
    topo.add_argument("--allow-disconnected", action="store_true", help="accept a disconnected graph")
    topo.add_argument("--json", action="store_true", help="print the statistics as JSON")
    topo.add_argument("--png", metavar="FILE", help="also draw the graph to this PNG file")
    topo.add_argument("--simulate", type=int, metavar="T",
                      help="gossip random vectors for T rounds and print the relative consensus error per round "
                           "beside the spectral prediction rho^t")

    sweep = sub.add_parser("sweep", help="run a seeded grid of experiments (resumable), then report over seeds")
    sweep.add_argument("config", help="YAML config file every run starts from")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a key and its values (YAML; quote mappings: 'topology=ring,{name: erdos_renyi, p: 0.2}'); "
                            "repeat for a Cartesian product")
    sweep.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    sweep.add_argument("--out", required=True, help="folder of the sweep: OUT/<cell>/seed<k>, logs and the report")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    sweep.add_argument("--nproc", type=int, default=1, help="processes per run, launched with torchrun (default 1)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every run (repeatable)")

    report = sub.add_parser("report", help="table and plots comparing finished runs")
    report.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl, summary.json, ...)")
    report.add_argument("--out", required=True, help="folder for summary.md and the PNG plots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # torch's C++ layer logs every distributed failure it raises; this command reports each in one
    # line of its own (set TORCH_CPP_LOG_LEVEL to see torch's logs). Read when torch loads, below.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    args = build_parser().parse_args(argv)
    args.invocation = shlex.join(["p2p-fedrot", *(sys.argv[1:] if argv is None else argv)])  # stamped on reports
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "report":
            return command_report(args)
        if args.command == "sweep":
            return command_sweep(args)
        return command_topology(args)
    except PeerError as exc:
        print(f"p2p-fedrot: peer failure: {exc}", file=sys.stderr, flush=True)
        # Pending receives from a dead neighbour can block interpreter shutdown: leave now.
        os._exit(1)
    except (P2PFedRotError, OSError) as exc:  # OSError names its path: an unwritable out, a missing file
        print(f"p2p-fedrot: error: {exc}", file=sys.stderr, flush=True)
        return 2


def command_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run.loop import run

    flags = [*(["resume=true"] if args.resume else []), *(["overwrite=true"] if args.overwrite else [])]
    config = load_config(args.config, [*args.overrides, *flags])
    summary = run(config)
    if summary:
        print(f"done: final mean accuracy {summary['final_mean_accuracy']:.4f}; outputs in {config.out}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .study.report import write_report

    unfinished = [run for run in args.runs if (Path(run) / "config.yaml").is_file() and not (Path(run) / "summary.json").is_file()]
    if unfinished:
        print(f"p2p-fedrot: note: {len(unfinished)} folder(s) hold a run that has not finished (it stopped early or "
              f"is still going), e.g. {unfinished[0]}; a robustness report counts them as stopped, others leave them "
              "out", file=sys.stderr)
    finished = [run for run in args.runs if run not in unfinished]
    print(write_report(finished, args.out, args.invocation, unfinished).terminal_text(), end="")
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .study.report import write_report
    from .study.sweep import parse_grid, parse_seeds, plan, run_sweep

    out = Path(args.out)
    runs = plan(args.config, [parse_grid(item) for item in args.grid], parse_seeds(args.seeds), out, args.overrides)
    failed = run_sweep(runs, args.config, out, args.jobs, args.nproc)
    finished = [run.folder for run in runs if run not in failed]
    started = [run.folder for run in failed if (run.folder / "config.yaml").is_file()]
    if finished:
        print(write_report(finished, out / "report", args.invocation, started).terminal_text(), end="")
    if failed:
        print(f"p2p-fedrot: error: {len(failed)} of {len(runs)} runs failed ({', '.join(r.label for r in failed)}); "
              f"their logs are in {out / 'logs'}; run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def command_topology(args: argparse.Namespace) -> int:
    from .graph.schedule import MixingSchedule
    from .graph.simulation import predicted_consensus_error, simulated_consensus_error
    from .graph.topologies import build_topology, check_drawable, draw_topology, progress_to, topology_stats
    from .graph.weights import DENSE_SPECTRAL_LIMIT, compose

    if args.peers < 2:
        raise ConfigError("--peers must be at least 2")
    if args.simulate is not None and args.simulate < 0:
        raise ConfigError(f"--simulate {args.simulate}: give a number of rounds, 0 or more")
    spec = args.spec
    if spec.lstrip().startswith("{"):
        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"topology spec {args.spec!r} is not a valid YAML mapping ({reason}); write it like "
                              "'{name: erdos_renyi, p: 0.2}'") from None
    with progress_to(sys.stderr):  # slow steps on large graphs announce themselves; stdout stays the result
        topology = build_topology(spec, args.peers, args.seed, args.allow_disconnected)
        graph = topology.graph_at(args.round)
        if args.png:
            check_drawable(graph)
        if topology.server and args.peers > DENSE_SPECTRAL_LIMIT:
            raise ConfigError(
                f"topology '{topology.name}': a server round's mixing matrix is dense (N x N), so it is described "
                f"for at most {DENSE_SPECTRAL_LIMIT:,} peers; use fewer peers, or 'star' for the hub's graph"
            )
        # a run's mixing, with equal client weights for the server's average; W stays sparse
        schedule = MixingSchedule(topology, args.mixing, [1] * (args.peers - 1), args.seed, 1.0)
        mixing = "server average" if topology.server else args.mixing
        stats = topology_stats(graph, compose(schedule.graph_steps(args.round)))
        if args.simulate is not None:
            stats["simulated_consensus_error"] = simulated_consensus_error(schedule, args.simulate, args.seed)
            stats["predicted_consensus_error"] = predicted_consensus_error(schedule, args.simulate)
    if args.json:
        print(json.dumps(stats))
    else:
        print_topology(stats, f"topology {topology.name} ({'static' if topology.static else 'time-varying'}, "
                              f"mixing {mixing})")
    if args.png:
        draw_topology(graph, args.png, title=f"{topology.name}, {args.peers} peers")
    return 0


def print_topology(stats: dict, title: str) -> None:
    """The statistics one per line, then the simulated consensus error per round beside its prediction."""
    skipped = stats.pop("skipped", {})
    simulated, predicted = stats.pop("simulated_consensus_error", None), stats.pop("predicted_consensus_error", None)
    width = max(len(k) for k in stats)
    print(title)
    for key, value in stats.items():
        if isinstance(value, float):  # a large ring's gap is ~1e-8: show its digits, not 0.000000
            value = f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.6f}"
        print(f"  {key:<{width}}  {value}")
    for key, reason in skipped.items():
        print(f"  ({key} skipped: {reason})")
    if simulated is not None:
        print("relative consensus error of gossiped random vectors (measured) and its spectral prediction:")
        print(f"  {'round':>5}  {'measured':>10}  {'predicted':>10}")
        for t, (measured, bound) in enumerate(zip(simulated, predicted)):
            print(f"  {t:>5}  {measured:>10.3e}  {bound:>10.3e}")
