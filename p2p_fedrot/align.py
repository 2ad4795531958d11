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
SIDES = ("A", "B")
ZERO_TOLERANCE = 1e-20  # ||M||_F at or below this means "nothing to align to" (e.g. B = 0 at init)


def _check(side: str, lam: float) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'A' or 'B', got {side!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (0: no rotation, 1: full Procrustes), got {lam}")


def _proper_rotation(u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U V^T, with U's last column negated where that product would be a reflection (det -1)."""
    rotation = u @ vh
    reflected = torch.linalg.det(rotation) < 0
    if reflected.any():
        u = u.clone()
        u[reflected, :, -1] = -u[reflected, :, -1]
        rotation = u @ vh
    return rotation


def soft_rotation(M: torch.Tensor, lam: float) -> torch.Tensor:
    """R = polar((1 - lam) I + lam R*) for a batch of r x r matrices M, R* = Procrustes rotation of M.

    R* maximises tr(R^T M) over rotations. Batch elements whose M is ~0 or whose SVD fails keep
    the identity. Returns float32 rotations of shape M.shape.
    """
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must be a batch of square matrices, got shape {tuple(M.shape)}")
    M = M.float()
    r = M.shape[-1]
    eye = torch.eye(r, dtype=torch.float32, device=M.device).expand_as(M)
    if lam == 0.0:
        return eye.clone()
    scale = M.flatten(-2).norm(dim=-1)
    usable = torch.isfinite(scale) & (scale > ZERO_TOLERANCE)
    safe = torch.where(usable[..., None, None], M, eye)
    try:
        u, _, vh = torch.linalg.svd(safe)
    except RuntimeError:  # the SVD did not converge: do not rotate at all
        return eye.clone()
    rotation = _proper_rotation(u, vh)
    if lam != 1.0:
        u, _, vh = torch.linalg.svd((1.0 - lam) * eye + lam * rotation)
        rotation = _proper_rotation(u, vh)
    usable = usable & torch.isfinite(rotation).flatten(-2).all(dim=-1)
    return torch.where(usable[..., None, None], rotation, eye)


def _cross(A: torch.Tensor, B: torch.Tensor, ref: torch.Tensor, side: str) -> torch.Tensor:
    """The r x r matrix whose Procrustes rotation aligns the chosen side to its reference."""
    if side == "A":
        return A.float() @ ref.float().T
    return B.float().T @ ref.float()


def _apply(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A <- R^T A, B <- B R (so B A is unchanged), in the factors' own dtype."""
    return (R.T @ A.float()).to(A.dtype), (B.float() @ R).to(B.dtype)


def align_pair(A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor | None, B_ref: torch.Tensor | None,
               side: Side, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate one module's factors so that side ``side`` moves toward its reference."""
    new_As, new_Bs = align_modules([A], [B], [A_ref if side == "A" else B_ref], side, lam)
    return new_As[0], new_Bs[0]


def align_modules(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                  side: Side, lam: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Align every module of a model with one batched SVD per distinct rank.

    ``refs[m]`` is module m's reference for ``side`` (A_ref or B_ref). Inputs are not modified.
    """
    _check(side, lam)
    if not len(As) == len(Bs) == len(refs):
        raise ValueError(f"got {len(As)} A, {len(Bs)} B and {len(refs)} reference tensors; need one of each per module")
    by_rank: dict[int, list[int]] = {}
    for m, (A, B, ref) in enumerate(zip(As, Bs, refs)):
        expected = A.shape if side == "A" else B.shape
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or ref is None or ref.shape != expected:
            raise ValueError(
                f"module {m}: need A (r x d_in), B (d_out x r) and a {side} reference of the same shape; "
                f"got A {tuple(A.shape)}, B {tuple(B.shape)}, reference {None if ref is None else tuple(ref.shape)}"
            )
        by_rank.setdefault(A.shape[0], []).append(m)
    if lam == 0.0:
        return [A.clone() for A in As], [B.clone() for B in Bs]
    new_As, new_Bs = list(As), list(Bs)
    for members in by_rank.values():
        M = torch.stack([_cross(As[m], Bs[m], refs[m], side) for m in members])
        rotations = soft_rotation(M, lam)
        for m, R in zip(members, rotations):
            new_As[m], new_Bs[m] = _apply(As[m], Bs[m], R)
    return new_As, new_Bs
