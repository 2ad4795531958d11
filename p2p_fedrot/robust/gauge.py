"""Gauge fixing: every pair of a receiver's row in one frame, the receiver's, before a rule reads it.

(A, B) and (G^-1 A, B G) are the same adapter B A for any invertible r x r G: rotations (G = R) and
scalings (G = I / c) change the factors and nothing the model computes. Rules that read factors
would otherwise mix coordinates that do not correspond, see rotated honest peers as far apart, and
let a peer that sends (c A, B / c) multiply the cross terms of a factor average by c.

Two steps remove the gauge. The balanced form B' = Q_b U S^1/2, A' = S^1/2 V^T Q_a^T (thin QRs
A^T = Q_a R_a, B = Q_b R_b, SVD R_b R_a^T = U S V^T; B A is never formed) has the same product and
||B'[:, k]|| = ||A'[k, :]|| = sqrt(s_k) for every rank direction k; it leaves only an orthogonal R
free, which the orthogonal Procrustes fit of the stacked [A'^T; B'] to the receiver's own balanced
factors takes away. The receiver's own frame is its balanced form with canonical signs, a function
of its product alone when its singular values are distinct; with repeated ones it is one of the
frames of that product, which rules that act linearly on the row do not notice.

Degenerate cases: a module whose receiver's product has not full rank r (B = 0 at LoRA init, where
balancing would zero the A every peer needs to learn) is left as sent for the whole row, as there is
no frame to align to. With a full-rank receiver, every sender's pair is balanced even when its own
product is rank-deficient or zero (the missing directions are zero), so that no sender escapes the
scaling gauge by zeroing a direction. A pair bitwise equal to the receiver's own takes the
receiver's fixed factors as they are, so that identical inputs stay identical bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..methods.decaf import canonical_signs
from ..peers.factors import FactorLayout

RANK_RTOL = 1e-6  # s_r <= RANK_RTOL * s_1: the product has not full rank (its frame would be ill-conditioned)


def _balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 balanced factors of a batch (A ... x r x n, B ... x m x r) and the product's r singular
    values (zero beyond min(r, m, n))."""
    r = A.shape[-2]
    q_a, r_a = torch.linalg.qr(A.double().mT)
    q_b, r_b = torch.linalg.qr(B.double())
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    root = s.sqrt()
    B2 = (q_b @ u) * root[..., None, :]
    A2 = root[..., :, None] * (vh @ q_a.mT)
    missing = r - s.shape[-1]  # tiny layers: fewer directions than the rank
    if missing:
        B2 = torch.nn.functional.pad(B2, (0, missing))
        A2 = torch.nn.functional.pad(A2, (0, 0, 0, missing))
        s = torch.nn.functional.pad(s, (0, missing))
    return A2, B2, s


def balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = B A and ||B'[:, k]|| = ||A'[k, :]|| for each rank direction k, per pair of
    a batch; in the factors' dtypes. A zero product gives zero factors."""
    A2, B2, _ = _balanced(A, B)
    return A2.to(A.dtype), B2.to(B.dtype)


def full_rank(s: torch.Tensor) -> torch.Tensor:
    """Whether each product of a batch, given its singular values (... x r, descending), has rank r."""
    return (s[..., 0] > 0) & (s[..., -1] > RANK_RTOL * s[..., 0])


def align_to(A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor,
             B_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R^T A, B R) with R the orthogonal matrix bringing the stacked [A^T; B] closest to [A_ref^T; B_ref],
    per pair of a batch (the reference broadcast); float64.

    R ranges over all orthogonal matrices, reflections included: the SVD of the balanced form fixes
    each direction only up to sign, and a single sign is a reflection that no rotation undoes (so
    methods/procrustes.py, which keeps det R = +1, does not fit here).
    """
    A, B = A.double(), B.double()
    u, _, vh = torch.linalg.svd(A @ A_ref.double().mT + B.mT @ B_ref.double())
    R = u @ vh
    return R.mT @ A, B @ R


def full_rank_modules(flat: torch.Tensor, layout: FactorLayout) -> tuple[bool, ...]:
    """Per module, whether this buffer's product has full rank (its gauge can be fixed)."""
    return tuple(bool(full_rank(_balanced(A, B)[2])) for A, B in zip(layout.a_views(flat), layout.b_views(flat)))


@dataclass(frozen=True)
class Frame:
    """A receiver's gauge for one row: per module its fixed factors and the maps T, T^-1 (r x r, float64)
    back to the factors it sent (A = T A', B = B' T^-1); None for a module left as sent."""

    layout: FactorLayout
    own: torch.Tensor  # the receiver's payload as sent
    fixed_own: torch.Tensor  # the same in the frame
    maps: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]

    @property
    def fixed(self) -> tuple[bool, ...]:
        """Per module, whether its gauge was fixed (the receiver's product has full rank)."""
        return tuple(m is not None for m in self.maps)

    def restore(self, flat: torch.Tensor) -> torch.Tensor:
        """A rule's result, computed in the frame, in the receiver's own gauge: per fixed module
        A_own + T (A - A'_own) and B_own + (B - B'_own) T^-1, which has the product B A and is
        exactly the receiver's own where the result is its fixed factors. Other parts as they are."""
        out = flat.clone()
        views = zip(self.layout.a_views(out), self.layout.b_views(out), self.layout.a_views(self.own),
                    self.layout.b_views(self.own), self.layout.a_views(self.fixed_own),
                    self.layout.b_views(self.fixed_own), self.maps)
        for A, B, A_own, B_own, A_fixed, B_fixed, maps in views:
            if maps is None:
                continue
            T, T_inv = maps
            A.copy_(A_own.double() + T @ (A.double() - A_fixed.double()))
            B.copy_(B_own.double() + (B.double() - B_fixed.double()) @ T_inv)
        return out


def gauge_fix(payloads: Sequence[torch.Tensor], own: int,
              layout: FactorLayout) -> tuple[list[torch.Tensor], Frame]:
    """Every payload of a row (full buffers, ``payloads[own]`` the receiver's) with its factors balanced
    and aligned to the receiver's frame: new buffers with the same products (up to rounding) and the
    head and dense deltas untouched; and the frame, whose :meth:`Frame.restore` takes a result back
    to the receiver's gauge."""
    fixed = [x.clone() for x in payloads]
    maps: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for a_spec, b_spec in zip(layout.a, layout.b):
        As = torch.stack([a_spec.view(x) for x in payloads])
        Bs = torch.stack([b_spec.view(x) for x in payloads])
        A2, B2, s = _balanced(As, Bs)
        if not full_rank(s[own]):
            maps.append(None)
            continue
        B_own, A_own = canonical_signs(B2[own], A2[own])
        maps.append(((As[own].double() @ A_own.mT) / s[own], (B_own.mT @ Bs[own].double()) / s[own][:, None]))
        A_aligned, B_aligned = align_to(A2, B2, A_own, B_own)
        for j, x in enumerate(fixed):
            same = j == own or (torch.equal(As[j], As[own]) and torch.equal(Bs[j], Bs[own]))
            a_spec.view(x).copy_(A_own if same else A_aligned[j])
            b_spec.view(x).copy_(B_own if same else B_aligned[j])
    return fixed, Frame(layout, payloads[own], fixed[own], tuple(maps))
