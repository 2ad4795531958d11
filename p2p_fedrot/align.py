"""Soft orthogonal Procrustes alignment of LoRA factors (FedRot-LoRA).

For a module with factors A (r x d_in) and B (d_out x r), any rotation R gives the same update:
(B R)(R^T A) = B A. Averaging factors across peers is not averaging products, but if every peer
first rotates its factors to match a common reference, the factors agree more and the averaged
product loses less. R is the rotation that best maps one side onto the reference, softened by
``lam`` toward the identity.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Side = Literal["A", "B"]
SIDES: tuple[Side, ...] = ("A", "B")
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


def _cross(X: torch.Tensor, ref: torch.Tensor, side: Side) -> torch.Tensor:
    """The fp32 r x r matrix whose Procrustes rotation fits X (side ``side``) to ``ref``.

    Zeroed when it is only rounding noise relative to the factors, so that it aligns to nothing.
    """
    X, ref = X.float(), ref.float()
    M = X @ ref.T if side == "A" else X.T @ ref
    return torch.where(M.norm() <= ZERO_RTOL * X.norm() * ref.norm(), 0.0, M)


def _apply(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A <- R^T A, B <- B R (B A unchanged), computed in at least fp32, returned in each factor's dtype."""
    a = torch.promote_types(A.dtype, torch.float32)
    b = torch.promote_types(B.dtype, torch.float32)
    return (R.T.to(a) @ A.to(a)).to(A.dtype), (B.to(b) @ R.to(b)).to(B.dtype)


def align_pair(A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor | None, B_ref: torch.Tensor | None,
               side: Side, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate one module's factors so that side ``side`` moves toward its reference.

    Only the reference of ``side`` is read; the other may be None.
    """
    new_As, new_Bs = align_modules([A], [B], [A_ref if side == "A" else B_ref], side, lam)
    return new_As[0], new_Bs[0]


def _check_module(m: int, A: torch.Tensor, B: torch.Tensor, ref: torch.Tensor | None, side: Side) -> None:
    fitted = A if side == "A" else B
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or ref is None or ref.shape != fitted.shape:
        raise ValueError(
            f"module {m}: need A (r x d_in), B (d_out x r) and a {side} reference of the same shape as {side}; "
            f"got A {tuple(A.shape)}, B {tuple(B.shape)}, reference {None if ref is None else tuple(ref.shape)}"
        )


def align_modules(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                  side: Side, lam: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Align every module of a model, with one batched soft_rotation call per distinct rank.

    ``refs[m]`` is module m's reference for ``side`` (A_ref or B_ref). Returns new tensors; the
    inputs are not modified.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    _check_lam(lam)
    if not len(As) == len(Bs) == len(refs):
        raise ValueError(f"got {len(As)} A, {len(Bs)} B and {len(refs)} reference tensors; need one of each per module")
    for m, (A, B, ref) in enumerate(zip(As, Bs, refs)):
        _check_module(m, A, B, ref, side)
    if lam == 0.0:
        return [A.clone() for A in As], [B.clone() for B in Bs]
    fitted = As if side == "A" else Bs
    by_rank: dict[int, list[int]] = {}
    for m, A in enumerate(As):
        by_rank.setdefault(A.shape[0], []).append(m)
    new_As, new_Bs = list(As), list(Bs)
    for members in by_rank.values():
        rotations = soft_rotation(torch.stack([_cross(fitted[m], refs[m], side) for m in members]), lam)
        for m, R in zip(members, rotations):
            new_As[m], new_Bs[m] = _apply(As[m], Bs[m], R)
    return new_As, new_Bs
