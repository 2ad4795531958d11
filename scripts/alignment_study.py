"""Where does aligning LoRA factors matter? A seeded grid on the toy task, reported as mean +/- std.

    python scripts/alignment_study.py                  # about 6 minutes on 2 CPU cores
    python scripts/alignment_study.py --seeds 0 1 2 --out runs/alignment_study

Grid: LoRA init {shared, per_peer, rotated, warm-start (shared, 3 rounds of local training before
the first exchange)} x method {fedit, fedrot consensus (lam 0.4, the paper's rule), fedrot
neighbours and pairwise (lam 1, side auto = joint), decaf} x topology {ring of 16 peers, server with
16 clients}, each over the given seeds. Every run is resumable (a finished one is read, not rerun).
Writes OUT/summary.md (a table per topology) and OUT/alignment.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from p2p_fedrot.config import load_config
from p2p_fedrot.runner import run

ROOT = Path(__file__).resolve().parents[1]
INITS = {"shared": [], "per_peer": ["model.lora.init=per_peer"], "rotated": ["model.lora.init=rotated"],
         "warm-start": ["train.warmup_rounds=3"]}
METHODS = {"fedit": ["method=fedit"],
           "fedrot consensus": ["method=fedrot", "method_args.reference=consensus", "method_args.lam=0.4"],
           "fedrot neighbours": ["method=fedrot", "method_args.reference=neighbours", "method_args.lam=1"],
           "fedrot pairwise": ["method=fedrot", "method_args.reference=pairwise", "method_args.lam=1"],
           "decaf": ["method=decaf"]}
TOPOLOGIES = {"ring": ["topology=ring", "peers=16"], "server": ["topology=server", "peers=17"]}
COMMON = ["rounds=10", "train.local_steps=10", "threads=1"]


def cell_runs(out: Path, seeds: list[int]) -> dict[tuple[str, str, str], list[list[dict]]]:
    """Run (or read) every cell and seed; each value is the seeds' metrics records."""
    results = {}
    for topology, topology_args in TOPOLOGIES.items():
        for init, init_args in INITS.items():
            for method, method_args in METHODS.items():
                runs = []
                for seed in seeds:
                    folder = out / topology / init / method.replace(" ", "_") / f"seed{seed}"
                    if not (folder / "summary.json").is_file():
                        config = load_config(ROOT / "configs" / "toy.yaml", [*COMMON, *topology_args, *init_args,
                                                                             *method_args, f"seed={seed}", f"out={folder}"])
                        run(config)
                    runs.append([json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()])
                results[(topology, init, method)] = runs
    return results


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +/- {std:.3f}"


def first_mixing(records: list[dict]) -> dict:
    """The first evaluated round in which peers mixed (after a warm-up, not round 1)."""
    return next((r for r in records if r["rotational_share"] is not None), records[-1])


def summary(results: dict, seeds: list[int]) -> str:
    lines = [f"# Alignment study (toy task, {len(seeds)} seeds: mean +/- std)\n",
             "First mixing round: relative aggregation error, rotational share of the edges' factor "
             "disagreement, mean rotation angle ||R - I||_F. Final: mean test accuracy after 10 rounds.\n"]
    for topology in TOPOLOGIES:
        lines += [f"\n## {topology}\n", "| init | method | final accuracy | aggregation error (first mix) | "
                  "rotational share | rotation angle |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for init in INITS:
            for method in METHODS:
                runs = results[(topology, init, method)]
                first = [first_mixing(records) for records in runs]
                lines.append(f"| {init} | {method} | {spread([records[-1]['mean_accuracy'] for records in runs])} | "
                             f"{spread([r['aggregation_error_rel'] for r in first])} | "
                             f"{spread([r['rotational_share'] for r in first])} | "
                             f"{spread([r['rotation_angle_mean'] for r in first])} |")
    return "\n".join(lines) + "\n\n![final accuracy](alignment.png)\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TOPOLOGIES), figsize=(12, 4), sharey=True)
    width = 0.8 / len(METHODS)
    for axis, topology in zip(axes, TOPOLOGIES):
        for k, method in enumerate(METHODS):
            finals = [[records[-1]["mean_accuracy"] for records in results[(topology, init, method)]] for init in INITS]
            means = [statistics.fmean(v) for v in finals]
            errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in finals]
            axis.bar([i + k * width for i in range(len(INITS))], means, width, yerr=errors, capsize=2, label=method)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(INITS))], list(INITS))
        axis.set_title(topology)
        axis.set_ylabel("final mean test accuracy")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "alignment_study")
    args = parser.parse_args()
    start = time.perf_counter()
    results = cell_runs(args.out, args.seeds)
    text = summary(results, args.seeds)
    (args.out / "summary.md").write_text(text)
    plot(results, args.out / "alignment.png")
    print(text)
    print(f"{len(results) * len(args.seeds)} runs in {time.perf_counter() - start:.0f} s; {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
