"""FedRot-LoRA / DFedRot: rotate the factors toward a reference before they are averaged.

A rotation R (soft orthogonal Procrustes, see procrustes.py) leaves each product B A unchanged, so local
models are untouched while the factors that get averaged agree better. None of the references costs
an extra message. ``reference``:

- ``consensus`` (sender-side, the paper's rule): each peer rotates toward its own state at the start of
  the round. After the previous gossip step that state IS the W-weighted consensus of its
  neighbourhood (in server mode: the global model the client adopted), but in gossip mode the fitted
  factor is that same state plus K steps of drift, so R ~ I: it never touches the rotational
  disagreement between neighbours.
- ``pairwise`` (receiver-side): each receiver rotates every incoming neighbour's factors toward its own
  before averaging (one Procrustes problem per neighbour).
- ``neighbours`` (receiver-side generalized Procrustes): every incoming factor pair, the receiver's own
  included, is rotated toward the W-weighted mean of the current pairs and the mean recomputed,
  ``iters`` times; then the rotated pairs are averaged (the receiver's optimizer moments turn with
  its own pair: see base.Combined). With lam = 1 no iteration can raise
  sum_j w_j ||X_j R_j - mean||^2 (each step minimises it over the R_j, then over the mean).

``reference: auto`` (the default) is ``consensus`` in server mode, which is then exactly FedRot-LoRA,
and ``neighbours`` in gossip mode, where the alignment study (docs/alignment.md) found it never worse than
consensus and far better when the neighbours' factors are misaligned; ``lam: auto`` is the paper's
0.4 for consensus and 1 (full rotation) for the receiver-side references.

``side`` is the fitted factor: A on odd rounds and B on even ones (``alternate``, the paper's), always A
or always B, or both at once (``joint``: Procrustes of the stacked [A^T; B]). ``auto`` (the default) is
alternate for ``consensus``, which keeps server mode exactly FedRot-LoRA, and joint for the
receiver-side references: fitting B alone at the receiver turns the shared A factors apart
(measured on the toy ring from a shared init: aggregation error 0.195 against fedit's 1.8e-3 in round
0), while joint stays at the identity where nothing is misaligned. A client adopting the
server's result takes it as it is, so that all clients hold the same factors. lam = 0 is fedit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..exact import weighted_sum
from .base import Aligned, Combined, Method, MethodContext, PeerState, RotationLog, adopts, register
from .procrustes import Side, fit_rotations, misfit, rotate

SIDES = ("auto", "alternate", "A", "B", "joint")
REFERENCES = ("consensus", "pairwise", "neighbours")
Factors = tuple[list[torch.Tensor], list[torch.Tensor]]  # per module: the A's and the B's
Inputs = list[tuple[float, torch.Tensor]]


@register
class FedRot(Method):
    name = "fedrot"
    sends_whole_buffers = True
    averages_buffers = True
    params = {"lam": "auto", "side": "auto", "reference": "auto", "iters": 2}

    def __init__(self, args: dict, context: MethodContext) -> None:
        super().__init__(args, context)
        if self.args["reference"] not in ("auto", *REFERENCES):
            raise ConfigError(f"method_args.reference = {self.args['reference']!r} must be auto or one of "
                              f"{', '.join(REFERENCES)}")
        reference = self.args["reference"]
        if reference == "auto":  # the paper's rule on a server; the neighbourhood's Procrustes in gossip
            reference = "consensus" if context.server else "neighbours"
        lam, iters = self.args["lam"], self.args["iters"]
        if lam == "auto":  # the paper's default for its own rule; full rotation at the receiver
            lam = 0.4 if reference == "consensus" else 1.0
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ConfigError(f"method_args.lam = {lam!r} must be auto or a number in [0, 1] (0: no alignment, "
                              "1: full rotation)")
        if self.args["side"] not in SIDES:
            raise ConfigError(f"method_args.side = {self.args['side']!r} must be one of {', '.join(SIDES)}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ConfigError(f"method_args.iters = {iters!r} must be a positive integer "
                              "(generalized Procrustes iterations of reference: neighbours)")
        self.lam = float(lam)
        self.iters = iters
        self.reference = reference
        self.needs_reference = self.reference == "consensus"

    def side_at(self, round: int) -> Side:
        side = self.args["side"]
        if side == "auto":
            side = "alternate" if self.reference == "consensus" else "joint"
        if side != "alternate":
            return side
        return "A" if round % 2 == 1 else "B"

    def aligns(self, round: int) -> bool:
        """Every round may align. The paper skips round 0 only because side B's reference is zero there
        (B = 0 at LoRA init) and a zero reference has no rotation: procrustes.soft_rotation returns exactly
        the identity for it, so side A and joint align from round 0 and side B waits for a nonzero B."""
        return self.lam > 0.0

    def before_send(self, peer: PeerState, round: int) -> Aligned:
        if self.reference != "consensus" or not self.aligns(round) or peer.reference is None:
            return Aligned()
        factors = self._views(peer.flat)
        Rs = fit_rotations(*factors, *self._views(peer.reference), self.side_at(round), self.lam)
        rotated, log = self._rotate_logged(factors, self._views(peer.reference), Rs, self.side_at(round))
        self._write(peer.flat, rotated, ())
        return Aligned(Rs, log)

    def combine_row(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]],
                    own: int | None) -> Combined:
        """Receiver-side references average copies of the inputs whose factors were rotated first. With
        ``neighbours`` the receiver's own factors turn as well, and the result says by how much."""
        if self.reference == "consensus" or not self.aligns(round) or adopts(inputs):
            return super().combine_row(peer, round, inputs, own)
        side = self.side_at(round)
        if self.reference == "pairwise":
            rows, log = self._pairwise(peer, inputs, own, side)
            return Combined(self.combine(peer, round, rows), log=log)
        factors, Rs, log = self.generalized_procrustes(self._stack([x for _, x in inputs]), [w for w, _ in inputs],
                                                       side)
        rotated = [(w, self._write(x.clone(), factors, (row,))) for row, (w, x) in enumerate(inputs)]
        return Combined(self.combine(peer, round, rotated), None if own is None else [R[own] for R in Rs], log)

    def _pairwise(self, peer: PeerState, inputs: Sequence[tuple[float, torch.Tensor]], own: int | None,
                  side: Side) -> tuple[Inputs, RotationLog]:
        """Each neighbour's factors rotated toward the receiver's own (its own payload stays as it is),
        and the log of those rotations."""
        moved = [k for k in range(len(inputs)) if k != own]
        rows, log = list(inputs), RotationLog()
        if moved:
            rotated, log = self._align(self._stack([inputs[k][1] for k in moved]), self._views(peer.flat), side)
            for row, k in enumerate(moved):
                rows[k] = (inputs[k][0], self._write(inputs[k][1].clone(), rotated, (row,)))
        return rows, log

    def generalized_procrustes(self, factors: Factors, weights: Sequence[float],
                               side: Side) -> tuple[Factors, list[torch.Tensor], RotationLog]:
        """Rotate every pair of the batch (row j: A_j, B_j) toward the ``weights``-weighted mean of the
        current pairs and recompute the mean, ``iters`` times. Returns the rotated pairs, per module
        each pair's whole rotation (the product over the iterations: what was applied), and their log
        with each pair's gain against the final mean."""
        original, total = factors, None
        for _ in range(self.iters):
            Rs = fit_rotations(*factors, *self._mean(factors, weights), side, self.lam)
            factors = rotate(*factors, Rs)
            total = Rs if total is None else [Q @ R for Q, R in zip(total, Rs)]
        mean = self._mean(factors, weights)
        return factors, total, rotation_log(total, misfit(*original, *mean, side), misfit(*factors, *mean, side))

    def _align(self, factors: Factors, refs: Factors, side: Side) -> tuple[Factors, RotationLog]:
        """The factors rotated toward ``refs`` (each reference broadcast over the batch), and the log."""
        return self._rotate_logged(factors, refs, fit_rotations(*factors, *refs, side, self.lam), side)

    @staticmethod
    def _rotate_logged(factors: Factors, refs: Factors, Rs: list[torch.Tensor],
                       side: Side) -> tuple[Factors, RotationLog]:
        rotated = rotate(*factors, Rs)
        return rotated, rotation_log(Rs, misfit(*factors, *refs, side), misfit(*rotated, *refs, side))

    def _views(self, flat: torch.Tensor) -> Factors:
        layout = self.context.layout
        return layout.a_views(flat), layout.b_views(flat)

    def _stack(self, flats: Sequence[torch.Tensor]) -> Factors:
        """Per module, the factors of several buffers as one batch (row k from ``flats[k]``)."""
        views = [self._views(flat) for flat in flats]
        return tuple([torch.stack(modules) for modules in zip(*(v[part] for v in views))] for part in (0, 1))

    @staticmethod
    def _mean(factors: Factors, weights: Sequence[float]) -> Factors:
        """sum_j w_j X_j per module, accumulated in row order as exact.weighted_sum (thread-independent)."""
        return tuple([weighted_sum(list(zip(weights, batch))) for batch in part] for part in factors)

    def _write(self, flat: torch.Tensor, factors: Factors, row: tuple[int, ...]) -> torch.Tensor:
        """Copy batch row ``row`` (() when the factors carry no batch) of ``factors`` into ``flat``; returns it."""
        views = self._views(flat)
        for part, values in zip(views, factors):
            for view, value in zip(part, values):
                view.copy_(value[row])
        return flat


def rotation_log(Rs: list[torch.Tensor], before: torch.Tensor, after: torch.Tensor) -> RotationLog:
    """Every rotation's ||R - I||_F and, per factor pair, the fitted side's distance to its reference
    after / before (1 where it already sat on it)."""
    angles = [torch.linalg.matrix_norm(R - torch.eye(R.shape[-1], device=R.device)).flatten() for R in Rs]
    gains = torch.where(before > 0, (after / before).sqrt(), 1.0)
    return RotationLog(torch.cat(angles).tolist(), gains.flatten().tolist())
