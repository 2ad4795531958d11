"""What a round leaves behind: its phase timings, its metrics record and its progress lines."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..console import announce

LONG_PHASE_S = 1.0  # a phase of a round that takes at least this long gets a progress line of its own


PHASES = ("train", "align", "exchange", "eval")  # the phases a round's record times


@dataclass
class RoundClock:
    """Seconds spent per phase in the current round."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to phase ``name`` (a phase may be entered several times a round)."""
        since = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - since


def round_record(round: int, elapsed: float, per_peer: dict[int, tuple], metrics: dict[str, float],
                 bytes_sent: int, bytes_total: int, absent: list[int], dropped: list[dict],
                 seconds: dict[str, float], causal_lm: bool, adversary: Sequence[int] = ()) -> dict:
    """One line of metrics.jsonl. ``per_peer`` maps each client to (accuracy, loss, local accuracy,
    local loss); ``metrics`` holds the consensus distance and aggregation errors. The means and the
    minimum are over honest clients, the ``adversary``'s left out (and reported apart)."""
    order = sorted(per_peer)
    honest = [p for p in order if p not in adversary]
    honest_accuracy = [per_peer[p][0] for p in honest]
    mean_loss = float(np.mean([per_peer[p][1] for p in honest]))
    record = {
        "round": round,
        "time_s": round_float(elapsed),
        "peers": order,
        "accuracy": [per_peer[p][0] for p in order],
        "loss": [per_peer[p][1] for p in order],
        "local_accuracy": [per_peer[p][2] for p in order],
        "local_loss": [per_peer[p][3] for p in order],
        "mean_accuracy": float(np.mean(honest_accuracy)),
        "min_accuracy": float(np.min(honest_accuracy)),
        "mean_loss": mean_loss,
        **({"adversary_peers": sorted(adversary),
            "adversary_mean_accuracy": float(np.mean([per_peer[p][0] for p in sorted(adversary)]))}
           if adversary else {}),
        **metrics,
        "bytes_sent": bytes_sent,
        "bytes_sent_total": bytes_total,
        "absent": absent,
        "dropped": sorted(dropped, key=lambda d: (d["round"], d["receiver"], d["sender"])),
        "seconds": {k: round_float(v) for k, v in seconds.items()},
    }
    if causal_lm:
        record["perplexity"] = math.exp(min(mean_loss, 50.0))
    return record


def round_float(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def announce_phase(round: int, rounds: int, done: str, seconds: float) -> None:
    """A line for a long phase of a round, e.g. "round 3/8: trained 4 peers in 12.1 s", so that a long
    round shows where it is; short phases stay silent, short rounds print only their round line."""
    if seconds >= LONG_PHASE_S:
        announce(f"round {round + 1}/{rounds}: {done} in {seconds:.1f} s")


def print_progress(round: int, rounds: int, elapsed: float, bytes_total: int, record: dict | None) -> None:
    """One line per round; accuracy and consensus only on rounds that were evaluated."""
    scores = "(not evaluated this round)"
    if record is not None:
        scores = (f"acc mean {record['mean_accuracy']:.3f} min {record['min_accuracy']:.3f} | "
                  f"consensus (rel) {record['consensus_distance_rel']:.2e}")
    print(f"round {round + 1:>3}/{rounds} | {scores} | {elapsed:.1f} s | {bytes_total / 1e6:.2f} MB sent", flush=True)
