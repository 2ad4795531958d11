"""Soft orthogonal Procrustes alignment of LoRA factors (FedRot-LoRA).

For a module with factors A (r x d_in) and B (d_out x r), any rotation R gives the same update:
(B R)(R^T A) = B A. Averaging factors across peers is not averaging products, but if every peer
first rotates its factors to match a common reference, the factors agree more and the averaged
product loses less. R is the rotation that best maps the fitted side onto its reference, softened
by ``lam`` toward the identity.

The fitted side is A, B, or both at once (``joint``): written as the matrix X that a rotation acts on
from the right (X -> X R), it is A^T, B, or the stacked [A^T; B], and M = X^T X_ref.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Side = Literal["A", "B", "joint"]
SIDES: tuple[Side, ...] = ("A", "B", "joint")
Refs = Sequence[torch.Tensor | None] | None  # one reference per module; None when the side does not read them
Pieces = list[tuple[torch.Tensor, torch.Tensor]]  # (X, X_ref) pairs of the fitted side, see _fitted
ZERO_ATOL = 1e-30  # ||M||_F at or below this: nothing to align to (e.g. B = 0 at LoRA init)
ZERO_RTOL = 1e-6  # ||M||_F <= ZERO_RTOL ||X||_F ||X_ref||_F: M is fp32 rounding noise, its rotation arbitrary


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (0: no rotation, 1: full Procrustes), got {lam!r}")


def _svd_uv(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U and V^T of each matrix in a batch.

    If the batched SVD fails, retry matrix by matrix so that only the failing ones get NaN factors
    (which the caller turns into the identity) instead of the whole batch.
    """
    try:
        u, _, vh = torch.linalg.svd(X)
        return u, vh
    except torch.linalg.LinAlgError:
        if X.dim() == 2:
            nan = torch.full_like(X, float("nan"))
            return nan, nan
        us, vhs = zip(*(_svd_uv(x) for x in X.reshape(-1, *X.shape[-2:])))
        return torch.stack(us).reshape(X.shape), torch.stack(vhs).reshape(X.shape)


def _nearest_rotation(X: torch.Tensor) -> torch.Tensor:
    """The rotation R (det +1) maximising tr(R^T X), for each matrix of a batch.

    That is U V^T from X = U S V^T, except where U V^T is a reflection: then the last column of U
    (smallest singular value) is negated, which costs the least of tr(R^T X).
    """
    u, vh = _svd_uv(X)
    signs = torch.ones(X.shape[:-1], dtype=X.dtype, device=X.device)
    signs[..., -1] = torch.where(torch.linalg.det(u @ vh) < 0, -1.0, 1.0)
    return (u * signs[..., None, :]) @ vh


def _finite_or_identity(R: torch.Tensor, keep: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """R where ``keep`` holds and R is finite, the identity elsewhere."""
    keep = keep & torch.isfinite(R).flatten(-2).all(dim=-1)
    return torch.where(keep[..., None, None], R, eye)


def soft_rotation(M: torch.Tensor, lam: float) -> torch.Tensor:
    """R = polar((1 - lam) I + lam R*) for a batch of r x r matrices M, R* the Procrustes rotation of M.

    R* maximises tr(R^T M) over rotations; ``lam`` < 1 stops partway toward it from the identity.
    The SVDs run in float64: r x r is cheap, and a rotation orthogonal to float64 precision keeps
    B A intact to fp32 rounding. Elements whose M is ~0 or non-finite, or whose SVD fails, get
    the identity. Returns float32 rotations of shape M.shape.
    """
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must be a batch of square matrices, got shape {tuple(M.shape)}")
    _check_lam(lam)
    M = M.double()
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
    if lam == 0.0:
        return eye.float()
    scale = M.flatten(-2).norm(dim=-1)
    usable = torch.isfinite(scale) & (scale > ZERO_ATOL)
    R = _finite_or_identity(_nearest_rotation(torch.where(usable[..., None, None], M, eye)), usable, eye)
    if lam != 1.0:  # polar factor: det((1 - lam) I + lam R) >= 0, so this is only a sign fix when it is 0
        R = _finite_or_identity(_nearest_rotation((1.0 - lam) * eye + lam * R), usable, eye)
    return R.float()


def _fitted(A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor, B_ref: torch.Tensor, side: Side) -> Pieces:
    """(X, X_ref) pieces of the fitted side, each rotated from the right: A^T for A, B for B, both for joint."""
    pieces = []
    if side != "B":
        pieces.append((A.mT, A_ref.mT))
    if side != "A":
        pieces.append((B, B_ref))
    return pieces


def _square_norm(X: torch.Tensor) -> torch.Tensor:
    return X.float().square().sum((-2, -1))


def _cross(pieces: Pieces) -> torch.Tensor:
    """The fp32 r x r matrix M = X^T X_ref whose Procrustes rotation fits X to X_ref (per batch element).

    Zeroed where it is only rounding noise relative to the factors, so that it aligns to nothing.
    """
    M = sum(x.float().mT @ ref.float() for x, ref in pieces)
    size = sum(_square_norm(x) for x, _ in pieces) * sum(_square_norm(ref) for _, ref in pieces)
    noise = torch.linalg.matrix_norm(M) <= ZERO_RTOL * size.sqrt()
    return torch.where(noise[..., None, None], 0.0, M)


def _apply(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A <- R^T A, B <- B R (B A unchanged), computed in at least fp32, returned in each factor's dtype."""
    a = torch.promote_types(A.dtype, torch.float32)
    b = torch.promote_types(B.dtype, torch.float32)
    return (R.mT.to(a) @ A.to(a)).to(A.dtype), (B.to(b) @ R.to(b)).to(B.dtype)


def _check_module(m: int, A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor | None, B_ref: torch.Tensor | None,
                  side: Side) -> None:
    read = [(name, factor, ref) for name, factor, ref in (("A", A, A_ref), ("B", B, B_ref)) if side in (name, "joint")]
    if (A.dim() < 2 or B.dim() != A.dim() or A.shape[:-2] != B.shape[:-2] or B.shape[-1] != A.shape[-2]
            or any(ref is None or ref.shape[-2:] != factor.shape[-2:] for _, factor, ref in read)):
        refs = ", ".join(f"{name} reference {None if ref is None else tuple(ref.shape)}" for name, _, ref in read)
        raise ValueError(
            f"module {m}: need A (... x r x d_in), B (... x d_out x r) with the same leading dimensions and a "
            f"reference shaped like each fitted factor; got A {tuple(A.shape)}, B {tuple(B.shape)}, {refs}"
        )


def _modules(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], A_refs: Refs, B_refs: Refs,
             side: Side) -> list[Pieces]:
    """The fitted pieces of every module, after checking that the factors and references fit together."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    n = len(As)
    A_refs = [None] * n if A_refs is None else A_refs
    B_refs = [None] * n if B_refs is None else B_refs
    if not len(Bs) == len(A_refs) == len(B_refs) == n:
        raise ValueError(f"got {n} A, {len(Bs)} B, {len(A_refs)} A reference and {len(B_refs)} B reference "
                         "tensors; need one of each per module (or no references for a side that is not fitted)")
    for m, args in enumerate(zip(As, Bs, A_refs, B_refs)):
        _check_module(m, *args, side)
    return [_fitted(*args, side) for args in zip(As, Bs, A_refs, B_refs)]


def fit_rotations(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], A_refs: Refs, B_refs: Refs,
                  side: Side, lam: float) -> list[torch.Tensor]:
    """Per module, the soft Procrustes rotations (float32, ... x r x r) moving the fitted side toward its reference.

    Module m's factors may carry leading batch dimensions (several peers' copies: A ... x r x d_in,
    B ... x d_out x r) that its references broadcast against; one rotation per batch element. The
    SVDs of every module and batch element of one rank run as one batched call.
    """
    _check_lam(lam)
    Ms = [_cross(pieces) for pieces in _modules(As, Bs, A_refs, B_refs, side)]
    by_rank: dict[int, list[int]] = {}
    for m, M in enumerate(Ms):
        by_rank.setdefault(M.shape[-1], []).append(m)
    Rs: list[torch.Tensor] = list(Ms)
    for r, members in by_rank.items():
        batch = soft_rotation(torch.cat([Ms[m].reshape(-1, r, r) for m in members]), lam)
        for m, R in zip(members, batch.split([Ms[m].numel() // (r * r) for m in members])):
            Rs[m] = R.reshape(Ms[m].shape)
    return Rs


def rotate(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
           Rs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A <- R^T A, B <- B R for every module (products unchanged); new tensors, the inputs are not modified."""
    pairs = [_apply(A, B, R) for A, B, R in zip(As, Bs, Rs)]
    return [A for A, _ in pairs], [B for _, B in pairs]


def misfit(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], A_refs: Refs, B_refs: Refs,
           side: Side) -> torch.Tensor:
    """sum_m ||X_m - X_ref_m||_F^2 of the fitted side (both factors for joint), per batch element, in fp32."""
    return sum(_square_norm(x - ref) for pieces in _modules(As, Bs, A_refs, B_refs, side) for x, ref in pieces)


def align_pair(A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor | None, B_ref: torch.Tensor | None,
               side: Side, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate one module's factors so that side ``side`` moves toward its reference.

    Only the references of the fitted side are read; the other may be None.
    """
    Rs = fit_rotations([A], [B], [A_ref], [B_ref], side, lam)
    (new_A,), (new_B,) = rotate([A], [B], Rs)
    return new_A, new_B


def align_modules(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                  side: Side, lam: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Align every module's side A or B to ``refs`` (module m's A_ref or B_ref); returns new tensors.

    Side joint reads both references: use :func:`fit_rotations` and :func:`rotate`.
    """
    A_refs, B_refs = (refs, None) if side == "A" else (None, refs)
    return rotate(As, Bs, fit_rotations(As, Bs, A_refs, B_refs, side, lam))
