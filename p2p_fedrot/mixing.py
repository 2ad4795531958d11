"""Gossip mixing matrices W (new x_i = sum_j W[i, j] x_j) and the spectral numbers that bound consensus speed.

Decentralized averaging converges to the true mean only when W is doubly stochastic, and the
error shrinks per round by the second largest eigenvalue modulus rho, so these helpers both build
W and check those two properties.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import networkx as nx
import numpy as np

from .errors import ConfigError

SCHEMES = ("metropolis", "uniform", "max_degree")


class MixingError(ConfigError):
    """A graph, matrix or weight vector cannot define a valid mixing step; the message says the fix."""


def _adjacency(graph: nx.Graph) -> np.ndarray:
    """0/1 adjacency in node-label order, self-loops dropped (a peer always keeps its own share)."""
    n = graph.number_of_nodes()
    if n == 0:
        raise MixingError("mixing_matrix: the graph has no nodes; give a graph with at least one peer")
    if set(graph.nodes) != set(range(n)):
        extra = sorted(map(str, set(graph.nodes) - set(range(n))))[:5]
        raise MixingError(
            f"mixing_matrix: nodes must be the integers 0..{n - 1} (peer ranks), found {extra}; "
            "relabel them, e.g. with nx.convert_node_labels_to_integers or topology.build_topology"
        )
    adjacency = nx.to_numpy_array(nx.Graph(graph), nodelist=range(n), weight=None, dtype=np.float64)
    np.fill_diagonal(adjacency, 0.0)
    return adjacency


def _with_diagonal(off_diagonal: np.ndarray) -> np.ndarray:
    """Put the remaining mass of each row on the diagonal so every row sums to 1."""
    return off_diagonal + np.diag(1.0 - off_diagonal.sum(axis=1))


def mixing_matrix(graph: nx.Graph, scheme: str = "metropolis") -> np.ndarray:
    """Mixing matrix of ``graph`` (float64, N x N, index = node label) for one gossip step."""
    if scheme not in SCHEMES:
        raise MixingError(f"unknown mixing scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    adjacency = _adjacency(graph)
    degree = adjacency.sum(axis=1)
    if scheme == "metropolis":
        return _with_diagonal(adjacency / (1.0 + np.maximum.outer(degree, degree)))
    if scheme == "max_degree":
        return _with_diagonal(adjacency / (1.0 + degree.max()))
    if degree.min() != degree.max():
        warnings.warn(
            "uniform mixing on an irregular graph is row-stochastic but not doubly stochastic: "
            "gossip will drift away from the true average; use 'metropolis' or 'max_degree' to avoid it",
            UserWarning,
            stacklevel=2,
        )
    return (adjacency + np.eye(len(degree))) / (degree + 1.0)[:, None]


def _square(W: np.ndarray) -> np.ndarray:
    matrix = np.asarray(W, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise MixingError(f"expected a non-empty square mixing matrix, got shape {matrix.shape}")
    return matrix


def is_symmetric(W: np.ndarray, atol: float = 1e-12) -> bool:
    """True if W equals its transpose up to ``atol``."""
    matrix = _square(W)
    return bool(np.allclose(matrix, matrix.T, rtol=0.0, atol=atol))


def is_doubly_stochastic(W: np.ndarray, atol: float = 1e-9) -> bool:
    """True if W is nonnegative and each row and column sums to 1 (gossip then preserves the mean)."""
    matrix = _square(W)
    return bool(
        (matrix >= -atol).all()
        and np.allclose(matrix.sum(axis=0), 1.0, rtol=0.0, atol=atol)
        and np.allclose(matrix.sum(axis=1), 1.0, rtol=0.0, atol=atol)
    )


def second_eigenvalue_modulus(W: np.ndarray) -> float:
    """rho = max(|lambda_2|, |lambda_N|): the per-round contraction factor of the consensus error."""
    matrix = _square(W)
    if len(matrix) == 1:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(matrix) if is_symmetric(matrix) else np.linalg.eigvals(matrix)
    return float(np.sort(np.abs(eigenvalues))[-2])


def spectral_gap(W: np.ndarray) -> float:
    """1 - rho: larger means faster consensus (1 for exact averaging in one step, 0 for no mixing)."""
    return 1.0 - second_eigenvalue_modulus(W)


def server_mixing_steps(client_weights: Sequence[float]) -> list[np.ndarray]:
    """The two steps of the star server mode: clients send to hub 0 (weighted average), then adopt it.

    Client j (node j >= 1) has weight ``client_weights[j - 1]``, e.g. its number of training
    examples, so the result is the FedAvg average on every node.
    """
    weights = np.asarray(client_weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0:
        raise MixingError(f"server_mixing_steps needs a flat list of one weight per client, got shape {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise MixingError(f"client weights must be finite and nonnegative, got {weights.tolist()}")
    if weights.sum() == 0:
        raise MixingError("client weights are all zero; give each client a positive weight (e.g. its example count)")
    n = len(weights) + 1
    up = np.eye(n)
    up[0, 0] = 0.0
    up[0, 1:] = weights / weights.sum()
    down = np.zeros((n, n))
    down[:, 0] = 1.0
    return [up, down]


def compose(steps: Sequence[np.ndarray]) -> np.ndarray:
    """A whole round's mixing: the product of its steps in the order they are applied."""
    combined = steps[0]
    for W in steps[1:]:
        combined = W @ combined
    return combined
