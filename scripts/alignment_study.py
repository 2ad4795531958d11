"""Where does aligning LoRA factors matter? A seeded grid on the toy task, reported as mean +/- std.

    python scripts/alignment_study.py                  # toy: 120 runs, about 2 minutes on 2 CPU cores
    python scripts/alignment_study.py --model minilm   # MiniLM on BBC news: 18 runs, about an hour
    python scripts/alignment_study.py --seeds 0 1 2 --out runs/alignment_study

Toy grid: LoRA init {shared, per_peer, rotated, warm-start (shared, 3 rounds of local training
before the first exchange)} x method {fedit, fedrot consensus (lam 0.4, the paper's rule), fedrot
neighbours and pairwise (lam 1, side auto = joint), decaf} x topology {ring of 16 peers, server with
16 clients}, 10 rounds of 10 SGD steps. MiniLM grid (configs/demo.yaml, AdamW): init {shared,
rotated} x method {fedit, fedrot neighbours, decaf} on a ring of 4 peers, 4 rounds of 4 steps.
Each cell runs over the given seeds; a finished run is read, not rerun. Writes OUT/summary.md (a
table per topology) and OUT/alignment.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from p2p_fedrot.config import load_config
from p2p_fedrot.run.loop import run

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
STUDIES = {  # model: (config, common overrides, inits, methods, topologies)
    "toy": ("toy.yaml", COMMON, INITS, METHODS, TOPOLOGIES),
    "minilm": ("demo.yaml", ["rounds=4", "train.local_steps=4", "eval.every=1", "data.test_samples=100", "threads=2"],
               {k: INITS[k] for k in ("shared", "rotated")},
               {k: METHODS[k] for k in ("fedit", "fedrot neighbours", "decaf")},
               {"ring": ["topology=ring", "peers=4"]}),
}


def cell_runs(study: str, out: Path, seeds: list[int]) -> dict[tuple[str, str, str], list[list[dict]]]:
    """Run (or read) every cell and seed; each value is the seeds' metrics records."""
    config_file, common, inits, methods, topologies = STUDIES[study]
    results = {}
    for topology, topology_args in topologies.items():
        for init, init_args in inits.items():
            for method, method_args in methods.items():
                runs = []
                for seed in seeds:
                    folder = out / topology / init / method.replace(" ", "_") / f"seed{seed}"
                    if not (folder / "summary.json").is_file():
                        config = load_config(ROOT / "configs" / config_file, [*common, *topology_args, *init_args,
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


def summary(study: str, results: dict, seeds: list[int]) -> str:
    _, _, inits, methods, topologies = STUDIES[study]
    lines = [f"# Alignment study ({study}, {len(seeds)} seeds: mean +/- std)\n",
             "First mixing round: relative aggregation error, rotational share of the edges' factor "
             "disagreement, mean rotation angle ||R - I||_F. Final: mean test accuracy after the last round.\n"]
    for topology in topologies:
        lines += [f"\n## {topology}\n", "| init | method | final accuracy | aggregation error (first mix) | "
                  "rotational share | rotation angle |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for init in inits:
            for method in methods:
                runs = results[(topology, init, method)]
                first = [first_mixing(records) for records in runs]
                lines.append(f"| {init} | {method} | {spread([records[-1]['mean_accuracy'] for records in runs])} | "
                             f"{spread([r['aggregation_error_rel'] for r in first])} | "
                             f"{spread([r['rotational_share'] for r in first])} | "
                             f"{spread([r['rotation_angle_mean'] for r in first])} |")
    return "\n".join(lines) + "\n\n![final accuracy](alignment.png)\n"


def plot(study: str, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, inits, methods, topologies = STUDIES[study]
    figure, axes = plt.subplots(1, len(topologies), figsize=(6 * len(topologies), 4), sharey=True, squeeze=False)
    axes = axes[0]
    width = 0.8 / len(methods)
    for axis, topology in zip(axes, topologies):
        for k, method in enumerate(methods):
            finals = [[records[-1]["mean_accuracy"] for records in results[(topology, init, method)]] for init in inits]
            means = [statistics.fmean(v) for v in finals]
            errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in finals]
            axis.bar([i + k * width for i in range(len(inits))], means, width, yerr=errors, capsize=2, label=method)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(inits))], list(inits))
        axis.set_title(topology)
        axis.set_ylabel("final mean test accuracy")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(STUDIES), default="toy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="default: runs/alignment_study_MODEL")
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / f"alignment_study_{args.model}"
    start = time.perf_counter()
    results = cell_runs(args.model, out, args.seeds)
    text = summary(args.model, results, args.seeds)
    (out / "summary.md").write_text(text)
    plot(args.model, results, out / "alignment.png")
    print(text)
    print(f"{len(results) * len(args.seeds)} runs in {time.perf_counter() - start:.0f} s; {out / 'summary.md'}")


if __name__ == "__main__":
    main()
