"""Disagreement metrics on LoRA products, computed through r x r Gram matrices (never d x d).

For modules with factors (A_j, B_j) and scaling s, the products P_j = s B_j A_j have inner products
<P_j, P_k> = s^2 tr((B_j^T B_k)(A_k A_j^T)). Every metric below is a quadratic form in that
Gram matrix, so memory stays O(n^2 r^2) whatever the layer width.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .factors import FactorLayout


def product_gram(layout: FactorLayout, flats: Sequence[torch.Tensor]) -> torch.Tensor:
    """G[j, k] = sum over modules of <P_j, P_k>, in float64."""
    n = len(flats)
    gram = torch.zeros(n, n, dtype=torch.float64, device=flats[0].device)
    per_peer_a = [layout.a_views(f) for f in flats]
    per_peer_b = [layout.b_views(f) for f in flats]
    for m, scaling in enumerate(layout.scalings):
        a = torch.stack([views[m] for views in per_peer_a]).double()  # n x r x d_in
        b = torch.stack([views[m] for views in per_peer_b]).double()  # n x d_out x r
        gram_b = torch.einsum("jdr,kds->jkrs", b, b)  # B_j^T B_k
        gram_a = torch.einsum("jrd,ksd->jkrs", a, a)  # A_j A_k^T
        gram += scaling**2 * torch.einsum("jkrs,kjsr->jk", gram_b, gram_a)
    return gram


def consensus_distance(layout: FactorLayout, flats: Sequence[torch.Tensor]) -> float:
    """(1/N) sum_i ||P_i - mean_k P_k||_F^2, summed over modules."""
    gram = product_gram(layout, flats)
    n = gram.shape[0]
    value = torch.trace(gram) / n - gram.sum() / n**2
    return max(float(value), 0.0)


def aggregation_error(layout: FactorLayout, weights: Sequence[float], flats: Sequence[torch.Tensor]) -> tuple[float, float]:
    """||sum_j w_j P_j - (sum_j w_j B_j)(sum_j w_j A_j)||_F (absolute, relative to the exact mix).

    The averaged factors are appended as an extra "peer" so one Gram matrix gives every term.
    """
    w = torch.tensor(list(weights), dtype=torch.float64)
    averaged = torch.zeros_like(flats[0])
    for weight, flat in zip(weights, flats):
        averaged.add_(flat, alpha=weight)
    gram = product_gram(layout, [*flats, averaged]).cpu()
    v = torch.cat([w, torch.tensor([-1.0], dtype=torch.float64)])
    error = float(v @ gram @ v)
    exact = float(w @ gram[:-1, :-1] @ w)
    error = max(error, 0.0) ** 0.5
    exact = max(exact, 0.0) ** 0.5
    return error, (error / exact if exact > 0 else 0.0)
