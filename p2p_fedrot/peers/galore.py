"""GaLore-Adam for dense weight deltas, and the second-moment lift and sync FedGaLore adds to it.

GaLore (Zhao et al., 2024) keeps Adam's moments in a low-rank projection of each weight's gradient:
the projector is the top-``rank`` singular basis of a gradient, refreshed every ``proj_every``
steps, and the update is projected back and multiplied by ``scale``. The projection side follows
the GaLore authors' ``std`` rule (the shorter side of the weight is projected), so steps match
their ``galore-torch`` package. A projector as wide as the weight spans everything; it is then the
identity and the step is plain Adam.

FedGaLore's synchronisation works on second moments lifted to the full weight shape, where peers
with different projectors can be compared: V (projected) -> (P * P) V, elementwise squares of the
projector, the variance each full coordinate receives when the projected ones are independent.
A synced moment comes back as a per-coordinate rescaling of the peer's own V (see
:func:`resync_second`), which keeps it positive and leaves it unchanged when nothing changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Side = Literal["left", "right", "identity"]
MAX_SYNC_RATIO = 100.0  # how far a sync may scale one coordinate's second moment
BETAS = (0.9, 0.999)  # Adam's defaults (torch and galore-torch)
EPS = 1e-8


@dataclass(frozen=True)
class GaLoreSettings:
    rank: int  # columns of the projector
    proj_every: int  # optimizer steps between projector refreshes
    scale: float  # multiplies the projected-back update (the delta's step is lr * scale)


def side_of(shape: tuple[int, int], rank: int) -> Side:
    """Which side of an (m, n) weight is projected: the shorter one, ``right`` on a tie (galore-torch's
    ``std``); ``identity`` when the rank covers the shorter side."""
    m, n = shape
    if rank >= min(m, n):
        return "identity"
    return "right" if m >= n else "left"


def projector_shape(shape: tuple[int, int], rank: int) -> tuple[int, int] | None:
    m, n = shape
    return {"left": (m, rank), "right": (rank, n), "identity": None}[side_of(shape, rank)]


def projected_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    """Shape of the moments: (rank, n) for a left projector, (m, rank) for a right one, (m, n) otherwise."""
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "identity": (m, n)}[side_of(shape, rank)]


def fit_projector(grad: torch.Tensor, rank: int, side: Side) -> torch.Tensor:
    """Top-``rank`` left singular vectors (m, rank) or right ones (rank, n) of the gradient."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return U[:, :rank].contiguous() if side == "left" else Vh[:rank].contiguous()


def project(grad: torch.Tensor, P: torch.Tensor | None, side: Side) -> torch.Tensor:
    if side == "identity":
        return grad
    return P.T @ grad if side == "left" else grad @ P.T


def project_back(low: torch.Tensor, P: torch.Tensor | None, side: Side, scale: float) -> torch.Tensor:
    if side == "identity":
        return low * scale
    return (P @ low if side == "left" else low @ P) * scale


def lift_second(V: torch.Tensor, P: torch.Tensor | None, side: Side) -> torch.Tensor:
    """A projected second moment as a full-shape one: (P*P) V or V (P*P)."""
    if side == "identity":
        return V.clone()
    squared = P * P
    return squared @ V if side == "left" else V @ squared


def project_second(lifted: torch.Tensor, P: torch.Tensor | None, side: Side) -> torch.Tensor:
    """A full-shape second moment seen in projected coordinates: (P * P)^T L or L (P * P)^T, the
    variance of a projected coordinate when the full ones are independent (a weighted average of
    non-negative values, so never negative)."""
    if side == "identity":
        return lifted
    squared = P * P
    return squared.T @ lifted if side == "left" else lifted @ squared.T


def resync_second(second: torch.Tensor, own: torch.Tensor, synced: torch.Tensor, P: torch.Tensor | None,
                  side: Side) -> torch.Tensor:
    """The projected second moment after a sync replaced the peer's lifted moment ``own`` by
    ``synced``: each coordinate is scaled by how much its projected variance changed, by at most
    MAX_SYNC_RATIO either way (so the sync moves an Adam step by at most its square root). A sync
    that hands the peer its own moment back changes nothing, bit for bit."""
    before = project_second(own, P, side)
    after = project_second(synced.clamp(min=0), P, side)
    ratio = (after / before.clamp(min=torch.finfo(before.dtype).tiny)).clamp_(1 / MAX_SYNC_RATIO, MAX_SYNC_RATIO)
    return torch.where(before > 0, second * ratio, after)


def adam_step(param: torch.Tensor, grad: torch.Tensor, P: torch.Tensor | None, side: Side, moment: torch.Tensor,
              second: torch.Tensor, step: int, lr: float, weight_decay: float, scale: float) -> None:
    """One GaLore-Adam step of one weight in place, as galore-torch's AdamW computes it (``step``
    counts this step, from 1): moments on the projected gradient, bias-corrected step size, the
    normalised update projected back and scaled, then decoupled weight decay."""
    beta1, beta2 = BETAS
    low = project(grad, P, side)
    moment.mul_(beta1).add_(low, alpha=1 - beta1)
    second.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    update = project_back(moment / second.sqrt().add_(EPS), P, side, scale)
    param.add_(update, alpha=-step_size)
    if weight_decay > 0:
        param.add_(param, alpha=-lr * weight_decay)


def joint_directions(weights: Sequence[float], lifted: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """The ``rank`` input directions (n x rank, orthonormal) that the peers' lifted (m x n) second
    moments of one weight have in common, AJIVE-style: each peer's signal subspace is the top-``rank``
    right singular subspace of its own moment, and the joint directions are the top eigenvectors of
    the weighted mean of those subspaces' projectors (eigenvalue 1 for a direction every peer has,
    w_i for one that only peer i has)."""
    total = sum(weights)
    n = lifted[0].shape[1]
    keep = min(rank, n)
    shared_projector = torch.zeros(n, n, dtype=torch.float64, device=lifted[0].device)
    for w, x in zip(weights, lifted):
        x = x.double()
        _, vectors = torch.linalg.eigh(x.T @ x)  # ascending: the last columns span the top right singular directions
        top = vectors[:, -keep:]
        shared_projector += (w / total) * (top @ top.T)
    return torch.linalg.eigh(shared_projector)[1][:, -keep:]


def joint_component(x: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
    """x Q Q^T in float64: the part of a lifted moment (m x n) along the joint directions Q (n x k)."""
    joint = joint.double()
    return (x.double() @ joint) @ joint.T


def sync_joint(own: torch.Tensor, mean: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
    """A peer's moment with its component along the joint directions replaced by the neighbourhood
    mean's, and the rest (what is the peer's own) kept: own + (mean - own) Q Q^T."""
    own64 = own.double()
    return (own64 + joint_component(mean.double() - own64, joint)).to(own.dtype)
