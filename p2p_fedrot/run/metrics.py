"""Disagreement metrics on LoRA products P_m = s_m B_m A_m (plus the dense delta of module m, for
methods that train one), computed by the processes hosting the peers.

No process ever holds every peer's factors or an N x N matrix:

* :func:`consensus_distance` takes the hosted peers' buffers and a few all-reduces (one dense
  d_out x d_in sum per module, plus a few small tensors). The sums are exact fixed-point sums
  (:mod:`.reduction`), and every per-peer value is computed elementwise or summed in a fixed pairwise
  order, so a peer's contribution has the same bits whatever batch, thread count or process computes
  it (a BLAS matmul or ``Tensor.sum`` does not promise that). The result is therefore bit-identical
  for any number of processes.
* :func:`aggregation_errors` is purely local: each mixing row's factors only, stacked and reduced by
  a QR decomposition, so memory is O(n r (d_in + d_out)) for a row of n buffers, never d x d.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..exact import FixedPointSum, Reduce, exact_sums, global_peaks, totals
from ..peers.factors import FactorLayout, TensorSpec

CHUNK_BYTES = 64 * 2**20  # dense products of one chunk of hosted peers


def _hosted(flats: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """One factor of every hosted peer, (k, *spec.shape), as a view of the (k, numel) buffers."""
    return flats[:, spec.offset : spec.offset + spec.numel].view(flats.shape[0], *spec.shape)


def _pairwise_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a pairwise order fixed by its length, overwriting ``x``: each
    row's bits depend on its own values only (Tensor.sum's order depends on threads and batch shape),
    and the rounding error grows as log n."""
    n = x.shape[-1]
    while n > 1:
        half = n // 2
        x[..., :half] += x[..., n - half : n]
        n -= half
    return x[..., 0]


def _products(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B A of a batch of peers, (c, d_out, d_in) float64, as r rank-one terms added in order t = 0..r-1.

    Elementwise, so a peer's bits do not depend on the batch, threads or device (a matmul's do not
    promise that). For float32 (or narrower) factors each term B_it A_tj is exact in float64, so a
    fused multiply-add rounds exactly like a multiply then an add.
    """
    a, b = a.double(), b.double()
    out = b[:, :, 0, None] * a[:, None, 0, :]
    for t in range(1, a.shape[1]):
        out.addcmul_(b[:, :, t, None], a[:, None, t, :])
    return out.mul_(scaling)


def _product_bound(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Max over the batch of a bound on |s B A| entries, |s| sum_t max|B[:, t]| max|A[t, :]|, from the
    factors alone (within a factor r of the true max: the fixed-point quantum loses at most log2 r bits)."""
    if a.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    a_max = torch.maximum(a.amax(-1), -a.amin(-1)).double()  # (c, r)
    b_max = torch.maximum(b.amax(-2), -b.amin(-2)).double()  # (c, r)
    return abs(scaling) * _pairwise_sum_(a_max * b_max).amax()


def _updates(a: torch.Tensor, b: torch.Tensor, scaling: float, delta: torch.Tensor | None) -> torch.Tensor:
    """Each peer's whole weight update of one module, s B A (+ its dense delta), float64 and elementwise."""
    out = _products(a, b, scaling)
    return out if delta is None else out.add_(delta.double())


def _update_bound(a: torch.Tensor, b: torch.Tensor, scaling: float, delta: torch.Tensor | None) -> torch.Tensor:
    bound = _product_bound(a, b, scaling)
    if delta is None or delta.shape[0] == 0:
        return bound
    return bound + delta.abs().amax().double()


def consensus_distance(layout: FactorLayout, flats: torch.Tensor, total: int, reduce: Reduce) -> tuple[float, float]:
    """(D, D / S): D = (1/N) sum_i sum_m ||P_i,m - mean_k P_k,m||_F^2 over all N = ``total`` peers of every
    process, and S = (1/N) sum_i sum_m ||P_i,m||_F^2, the peers' mean squared product norm, which gives
    D a scale (0: consensus; about 1: the peers' updates are as far apart as they are large; 0 when S is).

    ``flats`` (k, numel) holds this process's hosted peers (k may be 0; the process still takes part
    in every reduce, all processes in the same order). Two passes, so close peers lose nothing to
    cancellation: the exact sums of the products give the means, then each hosted peer's squared
    distance to them; the per-peer distances and norms are summed exactly too. Products are float64,
    one module and one chunk of peers (``CHUNK_BYTES``) at a time; every module's int64 sum is kept
    between the passes, so that one all-reduce combines them all (five in all, whatever the number
    of modules). The mean is off by at most
    about 2^-(62 - log2 N - log2 r) of the largest product entry (see :mod:`.reduction`).
    """
    k, device = flats.shape[0], flats.device
    deltas = [_hosted(flats, d) for d in layout.delta] or [None] * len(layout.a)
    modules = [(_hosted(flats, a), _hosted(flats, b), s, d) for a, b, s, d in zip(layout.a, layout.b, layout.scalings, deltas)]
    local = torch.stack([_update_bound(a, b, s, d) for a, b, s, d in modules])
    distances = torch.zeros(k, dtype=torch.float64, device=device)
    norms = torch.zeros(k, dtype=torch.float64, device=device)
    sums = []
    for (a, b, scaling, delta), peak in zip(modules, global_peaks(local, reduce)):
        summed = FixedPointSum(peak, total, (b.shape[1], a.shape[2]), device)
        for block in _blocks(k, summed.shape):
            products = _updates(a[block], b[block], scaling, None if delta is None else delta[block])
            summed.add(products)
            norms[block] += _pairwise_sum_(products.square_().flatten(1))  # in place: the sum has its copy
        sums.append(summed)
    for (a, b, scaling, delta), summed in zip(modules, totals(sums, reduce)):  # every module's sum at once
        mean = summed / total
        for block in _blocks(k, mean.shape):
            gap = _updates(a[block], b[block], scaling, None if delta is None else delta[block]).sub_(mean)
            distances[block] += _pairwise_sum_(gap.square_().flatten(1))
    distance, scale = (float(x) / total for x in exact_sums([distances, norms], reduce, [total, total]))
    return distance, distance / scale if scale > 0 else 0.0


def _blocks(peers: int, shape: tuple[int, ...]) -> list[slice]:
    """Slices of the hosted peers whose float64 products of ``shape`` fit in ``CHUNK_BYTES``."""
    chunk = max(1, CHUNK_BYTES // (8 * shape[0] * shape[1]))
    return [slice(lo, lo + chunk) for lo in range(0, peers, chunk)]


def _row_norms2(a_spec: TensorSpec, b_spec: TensorSpec, row: Sequence[tuple[float, torch.Tensor]],
                after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||X||_F^2, ||X - B'A'||_F^2) of one module without the scaling, X = sum_j w_j B_j A_j.

    Stacking the row, X - B'A' = [w_1 B_1 .. | -B'] [A_1; ..; A'] =: B A, and with A^T = Q R (Q
    orthonormal columns) ||B A||_F = ||B R^T||_F: entries are formed directly, not as a difference of
    Gram terms, so a small error keeps its digits. Terms whose A is bitwise A' (the peer's own A when
    only B is mixed, or a shared A) share its block, and their B's are combined before the product:
    a row that reproduces the buffer exactly has error exactly 0.
    """
    a_new, b_new = a_spec.view(after), b_spec.view(after).double()
    a_blocks, b_blocks = [a_new], [torch.zeros_like(b_new)]
    for weight, flat in row:
        a, b = a_spec.view(flat), weight * b_spec.view(flat).double()
        if torch.equal(a, a_new):
            b_blocks[0] += b
        else:
            a_blocks.append(a)
            b_blocks.append(b)
    r_factor = torch.linalg.qr(torch.cat(a_blocks).double().T, mode="r").R
    stacked = torch.cat(b_blocks, dim=1)
    exact = stacked @ r_factor.T
    stacked[:, : b_new.shape[1]] -= b_new
    error = stacked @ r_factor.T
    return _pairwise_sum_(exact.square_().flatten()), _pairwise_sum_(error.square_().flatten())


def _dense_row_norms2(layout: FactorLayout, m: int, row: Sequence[tuple[float, torch.Tensor]],
                      after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||X||_F^2, ||X - U'||_F^2) of module m when the layout has dense deltas: X = sum_j w_j U_j with
    U = s B A + dW, formed densely (the deltas are dense already)."""
    a, b, d, scaling = layout.a[m], layout.b[m], layout.delta[m], layout.scalings[m]

    def update(flat: torch.Tensor) -> torch.Tensor:
        return scaling * (b.view(flat).double() @ a.view(flat).double()) + d.view(flat).double()

    exact = sum(weight * update(flat) for weight, flat in row)
    error = exact - update(after)
    return _pairwise_sum_(exact.square().flatten()), _pairwise_sum_(error.square_().flatten())


def aggregation_errors(layout: FactorLayout, rows: Mapping[int, Sequence[tuple[float, torch.Tensor]]],
                       mixed: Mapping[int, torch.Tensor]) -> dict[int, tuple[float, float]]:
    """Per mixing peer i, (||sum_j w_ij P_j - P'_i||_F, that / ||sum_j w_ij P_j||_F, 0 when that is 0).

    ``rows[i]`` lists (w_ij, buffer j as sent) over i's row, i's own included; ``mixed[i]`` is i's buffer
    after mixing. Norms run over all modules together. The error is how far a peer's new adapter is from
    the exact weighted mix of its neighbourhood's adapters: for factor averaging,
    P'_i = s (sum_j w_ij B_j)(sum_j w_ij A_j), the loss of averaging factors instead of products.
    """
    errors = {}
    for i, row in rows.items():
        exact2 = error2 = 0.0
        if layout.delta:
            for m in range(len(layout.modules)):
                x2, e2 = _dense_row_norms2(layout, m, row, mixed[i])
                exact2, error2 = exact2 + float(x2), error2 + float(e2)
        else:
            for a_spec, b_spec, scaling in zip(layout.a, layout.b, layout.scalings):
                x2, e2 = _row_norms2(a_spec, b_spec, row, mixed[i])
                exact2 += scaling**2 * float(x2)
                error2 += scaling**2 * float(e2)
        absolute, norm = math.sqrt(error2), math.sqrt(exact2)
        errors[i] = (absolute, absolute / norm if norm > 0 else 0.0)
    return errors


def rotational_disagreement(layout: FactorLayout, own: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(removed, total) for one edge: total = sum over modules of ||A_j - A_i||^2 + ||B_j - B_i||^2
    between peer j's factors (``other``) and peer i's (``own``); removed = how much of it the best
    joint rotation of j toward i (A_j <- R^T A_j, B_j <- B_j R, det R = +1) takes away.

    With M = A_j A_i^T + B_j^T B_i (r x r), the distance after R is N - 2 tr(R^T M), so the best
    rotation gains 2 (s(M) - tr M), s(M) the sum of singular values (the smallest counted negative
    when U V^T has det -1). Only r x r products are formed.
    """
    crosses, total = [], 0.0
    for a_spec, b_spec in zip(layout.a, layout.b):
        a_i, a_j = a_spec.view(own).double(), a_spec.view(other).double()
        b_i, b_j = b_spec.view(own).double(), b_spec.view(other).double()
        total += float((a_j - a_i).square().sum() + (b_j - b_i).square().sum())
        crosses.append(a_j @ a_i.T + b_j.T @ b_i)
    cross = torch.stack(crosses)
    u, s, vh = torch.linalg.svd(cross)
    reflected = torch.linalg.det(u @ vh) < 0
    best = s.sum(dim=-1) - 2 * s[:, -1] * reflected
    removed = float((2 * (best - cross.diagonal(dim1=-2, dim2=-1).sum(dim=-1))).clamp(min=0).sum())
    return min(removed, total), total
