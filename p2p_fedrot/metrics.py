"""Disagreement metrics on LoRA products, computed through r x r Gram matrices (never d x d).

For modules with factors (A_j, B_j) and scaling s, the products P_j = s B_j A_j have inner products
<P_j, P_k> = s^2 tr((B_j^T B_k)(A_k A_j^T)). Every metric below is a quadratic form in that
Gram matrix, so memory stays O(n^2 r^2) whatever the layer width.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
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


def aggregation_error(layout: FactorLayout, W: np.ndarray, sent: Sequence[torch.Tensor],
                      mixed: Sequence[torch.Tensor], peers: Sequence[int]) -> tuple[float, float]:
    """Mean over ``peers`` of ||sum_j W_ij P_j - P'_i||_F, absolute and relative to ||sum_j W_ij P_j||_F.

    ``sent[j]`` holds peer j's factors as they left it (after training and alignment) and
    ``mixed[i]`` peer i's after the round's mixing: the error is how far a peer's new adapter is
    from the exact W-weighted mix of its neighbourhood's adapters. For factor averaging,
    P'_i = s (sum_j W_ij B_j)(sum_j W_ij A_j), the loss of averaging factors instead of products.
    One Gram matrix over all 2N buffers gives every term.
    """
    n = len(sent)
    gram = product_gram(layout, [*sent, *mixed]).cpu()
    rows = torch.zeros(len(peers), 2 * n, dtype=torch.float64)
    rows[:, :n] = torch.as_tensor(W[list(peers)], dtype=torch.float64)
    exact = (rows @ gram @ rows.T).diagonal().clamp(min=0).sqrt()
    rows[torch.arange(len(peers)), [n + i for i in peers]] -= 1.0
    error = (rows @ gram @ rows.T).diagonal().clamp(min=0).sqrt()
    relative = torch.where(exact > 0, error / exact, torch.zeros_like(error))
    return float(error.mean()), float(relative.mean())
