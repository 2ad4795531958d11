"""Screening of received payloads before they are mixed: the declared size, finite values, and a
norm within ``max_norm_ratio`` of the receiver's own. A bad payload either stops the run with a
line naming the sender (``fail``) or is left out of that receiver's mix (``drop``): the policies of
config.BAD_PAYLOAD_POLICIES."""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Mapping

import torch


@dataclass(frozen=True)
class PayloadRules:
    validate: bool = True
    max_norm_ratio: float = 100.0
    on_bad_payload: str = "fail"  # fail | drop


@dataclass(frozen=True)
class BadPayload:
    """One payload a receiver refused."""

    sender: int
    receiver: int
    reason: str

    def as_record(self, round: int) -> dict:
        return {"round": round, "sender": self.sender, "receiver": self.receiver, "reason": self.reason}


class PayloadScreen:
    """Checks each sender's payload once per mixing step, and each (sender, receiver) norm ratio."""

    def __init__(self, rules: PayloadRules, received: Mapping[int, torch.Tensor], own: Mapping[int, torch.Tensor],
                 numel_of: Callable[[int], int]) -> None:
        self.rules, self.received, self.own, self.numel_of = rules, received, own, numel_of
        self._sender_problem: dict[int, str | None] = {}
        self._received_norms: dict[int, float] = {}
        self._own_norms: dict[int, float] = {}

    def problem(self, sender: int, receiver: int) -> str | None:
        """Why ``receiver`` must not mix ``sender``'s payload, or None when it may. The size is
        always checked (a payload of another size cannot be mixed at all); the values only with
        ``validate``."""
        if sender not in self._sender_problem:
            self._sender_problem[sender] = self._check_sender(sender)
        if self._sender_problem[sender] or not self.rules.validate:
            return self._sender_problem[sender]
        own = _cached_norm(self._own_norms, self.own, receiver)
        theirs = _cached_norm(self._received_norms, self.received, sender)
        if own > 0 and theirs > self.rules.max_norm_ratio * own:
            return (f"its norm {theirs:.3g} is {theirs / own:.3g} times the receiver's own {own:.3g} "
                    f"(comm.max_norm_ratio is {self.rules.max_norm_ratio:g})")
        return None

    def _check_sender(self, sender: int) -> str | None:
        payload = self.received[sender]
        expected = self.numel_of(sender)
        if payload.numel() != expected:
            return f"it holds {payload.numel()} values where {expected} were expected (truncated or padded)"
        if not self.rules.validate:
            return None
        # one pass: the norm is finite exactly when every value is (counting them only on failure)
        if math.isfinite(_cached_norm(self._received_norms, self.received, sender)):
            return None
        finite = int(torch.isfinite(payload).sum())
        if finite == payload.numel():
            return "its norm overflows float32 (values beyond 1e19)"
        nan = int(torch.isnan(payload).sum())
        return f"{nan} NaN and {payload.numel() - finite - nan} infinite values"


def _cached_norm(cache: dict[int, float], payloads: Mapping[int, torch.Tensor], peer: int) -> float:
    """The payload's norm, computed once per step (in its own precision: a screen, not a metric)."""
    if peer not in cache:
        cache[peer] = float(torch.linalg.vector_norm(payloads[peer]))
    return cache[peer]
