"""How far each sender of a row is from the receiver: in product space, where the gauge cannot hide
anything, from r x r Grams (B A is never formed).

||B_j A_j - B_i A_i||_F^2 = <B_j^T B_j, A_j A_j^T> - 2 <B_i^T B_j, A_i A_j^T> + <B_i^T B_i, A_i A_i^T>,
with <X, Y> = sum(X * Y). Summed over modules (each times its scaling^2, so that the distance is
between the weight updates s B A) and added to the squared Euclidean distance of the head and the
dense deltas. A module whose receiver's product has not full rank (B = 0 at LoRA init) counts its
factors' distance instead: its product says nothing yet, and its factors are what a rule then mixes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..peers.factors import FactorLayout


def _inner(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (X * Y).sum((-2, -1))


def product_sq_distances(A_ref: torch.Tensor, B_ref: torch.Tensor, As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
    """||B_j A_j - B_ref A_ref||_F^2 for every pair j of a batch (As k x r x n, Bs k x m x r), float64,
    clamped at 0 (the Gram terms cancel for close pairs, and rounding could leave a tiny negative)."""
    A_ref, B_ref, As, Bs = A_ref.double(), B_ref.double(), As.double(), Bs.double()
    own = _inner(B_ref.mT @ B_ref, A_ref @ A_ref.mT)
    cross = _inner(B_ref.mT @ Bs, A_ref @ As.mT)
    theirs = _inner(Bs.mT @ Bs, As @ As.mT)
    return (theirs - 2.0 * cross + own).clamp_min(0.0)


def factor_sq_distances(A_ref: torch.Tensor, B_ref: torch.Tensor, As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
    """||A_j - A_ref||_F^2 + ||B_j - B_ref||_F^2 for every pair j of a batch, float64."""
    return ((As.double() - A_ref.double()).square().sum((-2, -1))
            + (Bs.double() - B_ref.double()).square().sum((-2, -1)))


def row_distances(payloads: Sequence[torch.Tensor], own: int, layout: FactorLayout,
                  products: Sequence[bool]) -> torch.Tensor:
    """Each payload's distance (float64, one per payload, 0 for ``payloads[own]``) to the receiver's:
    per module the product-space distance of the weight updates where ``products[m]``, else the
    factors' distance; plus the head's and dense deltas' Euclidean distance. Modules add in order."""
    ref = payloads[own]
    stacked = torch.stack(list(payloads))
    rest = layout.segments["head"][0]
    total = (stacked[:, rest:].double() - ref[rest:].double()).square().sum(-1)
    for a_spec, b_spec, scaling, product in zip(layout.a, layout.b, layout.scalings, products):
        As = stacked[:, a_spec.offset : a_spec.offset + a_spec.numel].view(-1, *a_spec.shape)
        Bs = stacked[:, b_spec.offset : b_spec.offset + b_spec.numel].view(-1, *b_spec.shape)
        if product:
            total = total + scaling**2 * product_sq_distances(a_spec.view(ref), b_spec.view(ref), As, Bs)
        else:
            total = total + factor_sq_distances(a_spec.view(ref), b_spec.view(ref), As, Bs)
    total[own] = 0.0
    return total.sqrt()
