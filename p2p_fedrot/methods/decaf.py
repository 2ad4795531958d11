"""DeCAF and FlexLoRA: average the products B_j A_j exactly, then re-factor at rank r.

Each peer receives its neighbours' factors (never a d x d matrix), forms the mixed product
X = sum_j w_j B_j A_j = [w_1 B_1 ... w_n B_n] [A_1; ...; A_n] implicitly, and takes its rank-r
truncated SVD through thin QRs of the two stacked factors and an SVD of the small (n r x n r)
core, so memory is O(d n r). New factors: B = U S^1/2, A = S^1/2 V^T. The head is averaged.
FlexLoRA is the same rule on the server: the hub does it, the clients adopt the result.
Same bytes as fedit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..exact import Reduce, exact_sum
from ..peers.factors import FactorLayout
from .base import Method, PeerState, adopts, register


def truncated_product_svd(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: Sequence[float], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of sum_j w_j B_j A_j, never forming it."""
    dtype = As[0].dtype
    stacked_b = torch.cat([w * b.double() for w, b in zip(weights, Bs)], dim=1)  # d_out x n r
    stacked_a = torch.cat([a.double() for a in As], dim=0)  # n r x d_in
    q_b, r_b = torch.linalg.qr(stacked_b)  # d_out x k, k x n r
    q_a, r_a = torch.linalg.qr(stacked_a.T)  # d_in x k, k x n r
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # small core
    root = s[:rank].sqrt()
    B = (q_b @ u[:, :rank]) * root
    A = root[:, None] * (vh[:rank] @ q_a.T)
    B, A = canonical_signs(B, A)
    if B.shape[1] < rank:  # fewer directions than the rank (tiny layers): pad with zeros
        B = torch.nn.functional.pad(B, (0, rank - B.shape[1]))
        A = torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0]))
    return B.to(dtype), A.to(dtype)


def canonical_signs(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (column k of B, row k of A) so that its largest entry in B is positive;
    per matrix of a batch (B ... x d_out x r, A ... x r x d_in).

    An SVD fixes each pair only up to sign; without a convention two peers holding the same product
    get factors with flipped columns, and averaging those factors destroys the product.
    """
    largest = B.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(B.gather(-2, largest))
    signs[signs == 0] = 1.0
    return B * signs, A * signs.mT


def mix_products(layout: FactorLayout, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """A full buffer: per module the re-factored product average, the head averaged plainly."""
    weights = [w for w, _ in inputs]
    out = torch.zeros_like(inputs[0][1])
    for weight, payload in inputs:  # head (and, overwritten below, A and B) as a plain average
        out.add_(payload, alpha=weight)
    per_a = [layout.a_views(x) for _, x in inputs]
    per_b = [layout.b_views(x) for _, x in inputs]
    for m, (a_out, b_out) in enumerate(zip(layout.a_views(out), layout.b_views(out))):
        B, A = truncated_product_svd([b[m] for b in per_b], [a[m] for a in per_a], weights, a_out.shape[0])
        b_out.copy_(B)
        a_out.copy_(A)
    return out


@register
class DeCAF(Method):
    name = "decaf"
    sends_whole_buffers = True
    resets_optimizer = True

    def combine(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
        if adopts(inputs):
            return inputs[0][1].clone()  # adopting one peer's factors (server down step): keep them as they are
        return mix_products(self.context.layout, inputs)

    def consensus(self, rows: torch.Tensor, count: int, reduce: Reduce) -> torch.Tensor:
        """The mean of the products, re-factored at rank r as this method mixes (the head averaged):
        averaging the factors themselves would not give the mean product."""
        layout = self.context.layout
        mean = super().consensus(rows, count, reduce)
        for a_spec, b_spec, a_out, b_out in zip(layout.a, layout.b, layout.a_views(mean), layout.b_views(mean)):
            products = torch.stack([b_spec.view(row).double() @ a_spec.view(row).double() for row in rows]) \
                if len(rows) else torch.zeros(0, b_spec.shape[0], a_spec.shape[1], dtype=torch.float64)
            product = exact_sum(products, reduce, count) / count
            u, s, vh = torch.linalg.svd(product, full_matrices=False)
            root = s[: a_spec.shape[0]].sqrt()
            B, A = canonical_signs(u[:, : a_spec.shape[0]] * root, root[:, None] * vh[: a_spec.shape[0]])
            b_out.copy_(B)
            a_out.copy_(A)
        return mean


@register
class FlexLoRA(DeCAF):
    name = "flexlora"
    server_only = True
