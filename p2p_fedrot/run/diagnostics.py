"""A round's disagreement and alignment numbers, combined over processes with exact sums.

Each process measured its own peers and rows (exchange_step.py) and collected the rotations its method
applied (what the round's align and mix phases returned); here the sums and counts are all-reduced, so
the record is the same whatever the number of processes.
"""

from __future__ import annotations

import torch

from ..exact import Reduce, exact_sums
from ..methods.base import RotationLog
from ..peers.factors import FactorLayout
from .exchange_step import MixOutcome
from .metrics import consensus_distance


def round_metrics(layout: FactorLayout, client_rows: torch.Tensor, clients: int, mixed: MixOutcome,
                  rotations: RotationLog, reduce: Reduce) -> dict[str, float | None]:
    """consensus_distance(_rel), aggregation_error(_rel), rotation_angle_mean/max, alignment_gain and
    rotational_share of the round (alignment_gain and rotational_share are None where nothing was
    measured: no rotation applied, no edge mixed)."""
    (errors, rows), (angles, rotated), (gains, aligned), (shares, edges) = _column_sums(
        [(mixed.errors, 2), ([(a,) for a in rotations.angles], 1), ([(g,) for g in rotations.gains], 1),
         (mixed.rotational, 2)], reduce)
    peak = torch.tensor([max(rotations.angles, default=0.0)], dtype=torch.float64)
    reduce(peak, "max")
    distance, relative = consensus_distance(layout, client_rows, clients, reduce)
    return {
        "consensus_distance": distance,
        "consensus_distance_rel": relative,
        "aggregation_error": errors[0] / rows if rows else 0.0,
        "aggregation_error_rel": errors[1] / rows if rows else 0.0,
        "rotation_angle_mean": angles[0] / rotated if rotated else 0.0,
        "rotation_angle_max": float(peak.item()),
        "alignment_gain": gains[0] / aligned if aligned else None,
        "rotational_share": (shares[0] / shares[1] if shares[1] > 0 else 0.0) if edges else None,
    }


def _column_sums(tables: list[tuple[list[tuple[float, ...]], int]], reduce: Reduce) -> list[tuple[list[float], int]]:
    """For each (rows, width) table: the column sums of every process's rows and how many rows there
    were in all; three all-reduces for all the tables together."""
    counts = torch.tensor([float(len(rows)) for rows, _ in tables], dtype=torch.float64)
    reduce(counts, "sum")
    totals = [int(c) for c in counts.tolist()]
    filled = [k for k, total in enumerate(totals) if total]  # the same on every process, so all skip alike
    sums = exact_sums([torch.tensor(tables[k][0], dtype=torch.float64).reshape(-1, tables[k][1]) for k in filled],
                      reduce, [totals[k] for k in filled]) if filled else []
    columns = dict(zip(filled, sums))
    return [(columns[k].tolist() if k in columns else [0.0] * width, total)
            for k, ((_, width), total) in enumerate(zip(tables, totals))]
