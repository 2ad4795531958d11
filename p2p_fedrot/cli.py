"""Command line: ``p2p-fedrot run CONFIG``, ``p2p-fedrot topology SPEC``, ``p2p-fedrot report RUN...``.

Errors a user can fix are printed as one line naming the problem and the fix, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
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

    report = sub.add_parser("report", help="table and plots comparing finished runs")
    report.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl, summary.json, ...)")
    report.add_argument("--out", required=True, help="folder for summary.md and the PNG plots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # torch's C++ layer logs every distributed failure it raises; this command reports each in one
    # line of its own (set TORCH_CPP_LOG_LEVEL to see torch's logs). Read when torch loads, below.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "report":
            return command_report(args)
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
    from .runner import run

    flags = [*(["resume=true"] if args.resume else []), *(["overwrite=true"] if args.overwrite else [])]
    config = load_config(args.config, [*args.overrides, *flags])
    summary = run(config)
    if summary:
        print(f"done: final mean accuracy {summary['final_mean_accuracy']:.4f}; outputs in {config.out}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.runs, args.out)
    print(path.read_text())
    return 0


def command_topology(args: argparse.Namespace) -> int:
    from .mixing import DENSE_SPECTRAL_LIMIT, compose, mixing_matrix, server_mixing_steps
    from .topology import build_topology, check_drawable, draw_topology, progress_to, topology_stats

    if args.peers < 2:
        raise ConfigError("--peers must be at least 2")
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
        if topology.server:  # a round is the hub's average then the clients' adoption (equal weights here)
            if args.peers > DENSE_SPECTRAL_LIMIT:
                raise ConfigError(
                    f"topology '{topology.name}': a server round's mixing matrix is dense (N x N), so it is described "
                    f"for at most {DENSE_SPECTRAL_LIMIT:,} peers; use fewer peers, or 'star' for the hub's graph"
                )
            W, mixing = compose(server_mixing_steps([1.0] * (args.peers - 1))), "server average"
        else:  # W is sparse: an N x N array of 20,000 peers would be 3.2 GB
            W, mixing = mixing_matrix(graph, args.mixing), args.mixing
        stats = topology_stats(graph, W)
    if args.json:
        print(json.dumps(stats))
    else:
        skipped = stats.pop("skipped", {})
        width = max(len(k) for k in stats)
        print(f"topology {topology.name} ({'static' if topology.static else 'time-varying'}, mixing {mixing})")
        for key, value in stats.items():
            if isinstance(value, float):  # a large ring's gap is ~1e-8: show its digits, not 0.000000
                value = f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.6f}"
            print(f"  {key:<{width}}  {value}")
        for key, reason in skipped.items():
            print(f"  ({key} skipped: {reason})")
    if args.png:
        draw_topology(graph, args.png, title=f"{topology.name}, {args.peers} peers")
    return 0
