"""What mixing alone does to disagreement: gossip of random vectors, beside the spectral prediction.

The relative consensus error after t rounds is ||X_t - 1 mean(X_t)||_F / ||X_0 - 1 mean(X_0)||_F.
For a static graph the prediction is rho^t, rho the second largest eigenvalue modulus of one
round's mixing (for a symmetric W the worst starting vector decays exactly so, a random one at most
so). A time-varying graph has no single rho: its prediction after t rounds is the worst case over
starting vectors, ||(I - J) W_t-1 ... W_0 (I - J)||_2, with J the averaging matrix (dense, so for at
most ``DENSE_SPECTRAL_LIMIT`` peers).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .schedule import MixingSchedule
from .weights import DENSE_SPECTRAL_LIMIT, compose, second_eigenvalue_modulus

WIDTH = 16  # coordinates of each peer's random vector


def _disagreement(x: np.ndarray) -> float:
    return float(np.linalg.norm(x - x.mean(axis=0, keepdims=True)))


def simulated_consensus_error(schedule: MixingSchedule, rounds: int, seed: int = 0) -> list[float]:
    """Relative consensus error of Gaussian vectors gossiped with the schedule's steps, rounds 0..T."""
    x = np.random.default_rng(seed).standard_normal((schedule.topology.peers, WIDTH))
    start = _disagreement(x)
    errors = [1.0]
    for round in range(rounds):
        for W in schedule.steps_at(round):
            x = W @ x
        errors.append(_disagreement(x) / start)
    return errors


def predicted_consensus_error(schedule: MixingSchedule, rounds: int) -> list[float]:
    """rho^t for a static graph; for a time-varying one, the worst-case contraction of the product of
    its rounds' steps (see the module docstring), rounds 0..T."""
    if schedule.topology.static:
        rho = second_eigenvalue_modulus(compose(schedule.steps_at(0)))
        return [rho**t for t in range(rounds + 1)]
    n = schedule.topology.peers
    if n > DENSE_SPECTRAL_LIMIT:
        raise ConfigError(f"the prediction for a time-varying graph multiplies dense {n} x {n} matrices; "
                          f"simulate at most {DENSE_SPECTRAL_LIMIT:,} peers")
    centre = np.eye(n) - np.full((n, n), 1.0 / n)
    product = np.eye(n)
    predicted = [1.0]
    for round in range(rounds):
        for W in schedule.steps_at(round):
            product = W @ product
        predicted.append(float(np.linalg.norm(centre @ product @ centre, ord=2)))
    return predicted
