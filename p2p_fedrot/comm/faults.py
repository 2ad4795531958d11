"""Fault drill: corrupt one peer's outgoing message in one round (``comm.inject_fault``), to
rehearse what a run does with a faulty neighbour. The peer's own state stays clean. The kinds
(config.FAULT_KINDS): nan, inf, scale, truncate."""

from __future__ import annotations

import torch

SCALE_OVER_LIMIT = 10.0  # "scale" multiplies by this times comm.max_norm_ratio


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
