"""Fault drill: corrupt one peer's outgoing message in one round (``comm.inject_fault``), to
rehearse what a run does with a faulty neighbour. The peer's own state stays clean. The kinds
(config.FAULT_KINDS): nan, inf, scale, truncate, which the sender makes, and tamper, which alters
the payload in its frames to other processes after their MAC is computed, as a writer on the wire
would (transport.py applies it)."""

from __future__ import annotations

import torch

SCALE_OVER_LIMIT = 10.0  # "scale" multiplies by this times comm.max_norm_ratio
TAMPER = "tamper"  # the kind the transport applies, to frames between processes only


def corrupted(payload: torch.Tensor, kind: str, max_norm_ratio: float) -> torch.Tensor:
    """A corrupted copy of ``payload``: NaN or Inf in every other value, scaled far beyond the
    norm limit, or cut to half its length."""
    if kind == "truncate":
        return payload[: payload.numel() // 2].clone()
    if kind == "scale":
        return payload * (SCALE_OVER_LIMIT * max_norm_ratio)
    bad = payload.clone()
    bad[::2] = float("nan") if kind == "nan" else float("inf")
    return bad


def altered_on_the_wire(piece: torch.Tensor) -> torch.Tensor:
    """A copy of a payload as sent, with the sign bit of every value flipped. Its norm and its finite
    values are those of the original, so payload screening cannot tell: only a frame's MAC can."""
    return piece.neg()
