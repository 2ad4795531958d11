"""Gossip mixing matrices W (new x_i = sum_j W[i, j] x_j) and the spectral numbers that bound consensus speed.

Decentralized averaging converges to the true mean only when W is doubly stochastic, and the
error shrinks per round by the second largest eigenvalue modulus rho, so these helpers both build
W and check those two properties. Every step is a canonical float64 CSR array (sorted column
indices, no stored zeros): runs of thousands of peers never hold an N x N array, and a row's
stored entries are exactly the peers it receives from. The checks accept dense arrays too.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from itertools import chain

import networkx as nx
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse.linalg import ArpackError, LinearOperator, eigs, eigsh, splu

from ..errors import ConfigError

SCHEMES = ("metropolis", "uniform", "max_degree")
DENSE_SPECTRAL_LIMIT = 1000  # above this many peers rho comes from sparse ARPACK solvers (dense ones are O(N^3))
ARPACK_RESTARTS = 100  # plain Lanczos restarts (about a second at N = 20000) before a slowly mixing W moves to shift-invert
SHIFT = 1e-9  # the shift-invert pole sits this far (relative) beyond the spectrum, so W -/+ shift*I stay invertible

log = logging.getLogger(__name__)


class MixingError(ConfigError):
    """A graph, matrix or weight vector cannot define a valid mixing step; the message says the fix."""


def _peer_count(graph: nx.Graph) -> int:
    """The node count, checked: W is indexed by peer rank, so the nodes must be exactly 0..N-1."""
    n = graph.number_of_nodes()
    if n == 0:
        raise MixingError("mixing_matrix: the graph has no nodes; give a graph with at least one peer")
    if set(graph.nodes) != set(range(n)):
        extra = sorted(map(str, set(graph.nodes) - set(range(n))))[:5]
        raise MixingError(
            f"mixing_matrix: nodes must be the integers 0..{n - 1} (peer ranks), found {extra}; "
            "relabel them, e.g. with nx.convert_node_labels_to_integers or graph.topologies.build_topology"
        )
    return n


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise MixingError(f"unknown mixing scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _warn_if_irregular(degree: np.ndarray) -> None:
    """Uniform weights keep the average only on a regular graph: say so (at the mixing_matrix caller)."""
    if degree.min() != degree.max():
        warnings.warn(
            "uniform mixing on an irregular graph is row-stochastic but not doubly stochastic: "
            "gossip will drift away from the true average; use 'metropolis' or 'max_degree' to avoid it",
            UserWarning,
            stacklevel=3,
        )


def mixing_matrix(graph: nx.Graph, scheme: str = "metropolis") -> sparse.csr_array:
    """Mixing step of ``graph`` (float64 N x N CSR, index = node label), built from the edge list.

    A directed edge u -> v is a route from u to v only, and the weights count the peers a row hears
    from. Memory grows with the edges, not with N^2, so it serves graphs of thousands of peers. Each
    diagonal entry is 1 minus its row's off-diagonal weights added in ascending column order, so
    the same graph gives the same bits whatever order its edges were inserted in.
    """
    _check_scheme(scheme)
    n, rows, columns = _directed_edges(graph)
    degree = np.bincount(rows, minlength=n).astype(np.float64)
    if scheme == "metropolis":
        weights = 1.0 / (1.0 + np.maximum(degree[rows], degree[columns]))
    elif scheme == "max_degree":
        weights = np.full(len(rows), 1.0 / (1.0 + degree.max()))
    else:
        _warn_if_irregular(degree)
        weights = 1.0 / (degree[rows] + 1.0)
    off_diagonal = from_entries(rows, columns, weights, n)
    return canonical(off_diagonal + sparse.diags_array(1.0 - row_sums(off_diagonal), format="csr"))


def _directed_edges(graph: nx.Graph) -> tuple[int, np.ndarray, np.ndarray]:
    """(N, rows, columns): (receiver, sender) of every route, self-loops dropped, without an N x N array:
    an undirected edge is a route each way, a directed edge u -> v one route (v hears from u), so a
    row's degree counts the peers it hears from.

    Read from the adjacency mapping, which lists each edge from both ends (graph.edges would also
    tie the graph into a reference cycle that only the garbage collector frees).
    """
    n = _peer_count(graph)
    adjacency = graph.pred if graph.is_directed() else graph.adj
    columns = np.fromiter(chain.from_iterable(adjacency[u] for u in range(n)), dtype=np.int64)
    rows = np.repeat(np.arange(n), [len(adjacency[u]) for u in range(n)])
    distinct = rows != columns
    return n, rows[distinct], columns[distinct]


# ---------------------------------------------------------------- CSR mixing steps


def canonical(W: sparse.csr_array) -> sparse.csr_array:
    """Sort W's column indices and drop its stored zeros, in place, and return it: gossip takes a
    row's stored entries as its routes and sums them in ascending j, so sums are bit-reproducible."""
    W.sum_duplicates()  # sorts the indices too
    W.eliminate_zeros()
    return W


def from_entries(rows: np.ndarray, columns: np.ndarray, weights: np.ndarray, n: int) -> sparse.csr_array:
    """The canonical N x N step with W[rows[k], columns[k]] = weights[k]."""
    return canonical(sparse.csr_array((weights, (rows, columns)), shape=(n, n), dtype=np.float64))


def row_indices(W: sparse.csr_array) -> np.ndarray:
    """The row of each stored entry (aligned with W.indices and W.data)."""
    return np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))


def row_sums(W: sparse.csr_array) -> np.ndarray:
    """Each row's sum, added left to right over its stored entries (a CSR product with ones does
    exactly that), so a canonical W gives the same bits on every process."""
    return W @ np.ones(W.shape[1])


def _square(W: np.ndarray | sparse.sparray) -> np.ndarray | sparse.csr_array:
    """W as float64, dense or CSR as given, checked to be square and non-empty."""
    matrix = sparse.csr_array(W, dtype=np.float64) if sparse.issparse(W) else np.asarray(W, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise MixingError(f"expected a non-empty square mixing matrix, got shape {matrix.shape}")
    return matrix


def is_symmetric(W: np.ndarray | sparse.sparray, atol: float = 1e-12) -> bool:
    """True if W equals its transpose up to ``atol``."""
    matrix = _square(W)
    if sparse.issparse(matrix):
        return bool(abs(matrix - matrix.T).max() <= atol)
    return bool(np.allclose(matrix, matrix.T, rtol=0.0, atol=atol))


def is_doubly_stochastic(W: np.ndarray | sparse.sparray, atol: float = 1e-9) -> bool:
    """True if W is nonnegative and each row and column sums to 1 (gossip then preserves the mean)."""
    matrix = _square(W)
    columns, rows = (np.asarray(matrix.sum(axis=axis)).ravel() for axis in (0, 1))
    return bool(
        matrix.min() >= -atol
        and np.allclose(columns, 1.0, rtol=0.0, atol=atol)
        and np.allclose(rows, 1.0, rtol=0.0, atol=atol)
    )


def second_eigenvalue_modulus(W: np.ndarray | sparse.sparray) -> float:
    """rho = max(|lambda_2|, |lambda_N|): the per-round contraction factor of the consensus error.

    Up to DENSE_SPECTRAL_LIMIT peers all eigenvalues are computed; above it sparse ARPACK solvers find
    only the extreme ones, and a solver that does not converge gives NaN with a warning.
    """
    matrix = _square(W)
    if matrix.shape[0] == 1:
        return 0.0
    if matrix.shape[0] > DENSE_SPECTRAL_LIMIT:
        return _sparse_rho(sparse.csr_array(matrix, copy=True))
    if sparse.issparse(matrix):
        matrix = matrix.toarray()
    eigenvalues = np.linalg.eigvalsh(matrix) if is_symmetric(matrix) else np.linalg.eigvals(matrix)
    return float(np.sort(np.abs(eigenvalues))[-2])


def spectral_gap(W: np.ndarray | sparse.sparray) -> float:
    """1 - rho: larger means faster consensus (1 for exact averaging in one step, 0 for no mixing)."""
    return 1.0 - second_eigenvalue_modulus(W)


# ---------------------------------------------------------------- rho of large sparse W


def _sparse_rho(W: sparse.csr_array) -> float:
    """rho from the irreducible blocks of W: its spectrum is the union of theirs, and within one block
    of a nonnegative W the top eigenvalue is simple, which single-vector Lanczos needs to see it once."""
    W.eliminate_zeros()  # csgraph counts stored zeros as edges
    radius = _radius_bound(W)
    if radius == 0:
        return 0.0
    symmetric = is_symmetric(W)
    if not symmetric:
        W, symmetric = _balanced(W)
    log.info("rho of the %d x %d mixing matrix with a sparse eigensolver...", *W.shape)
    count, labels = csgraph.connected_components(W, directed=not symmetric, connection="strong")
    blocks = [W] if count == 1 else [W[members][:, members] for members in _members(labels, count)]
    moduli = np.concatenate([_top_two_moduli(block, symmetric, radius) for block in blocks])
    return float(np.sort(moduli)[-2])


def _radius_bound(W: sparse.csr_array) -> float:
    """min(||W||_1, ||W||_inf) >= the spectral radius of W, of its diagonal blocks and of any matrix
    similar to those: 1 for a stochastic W, so a shift just above it sits right next to lambda_1."""
    magnitude = abs(W)
    return float(min(magnitude.sum(axis=0).max(), magnitude.sum(axis=1).max()))


def _balanced(W: sparse.csr_array) -> tuple[sparse.csr_array, bool]:
    """(D W D^-1, True) with D = diag(W)^-1/2 when that similar matrix is symmetric, else (W, False).

    Uniform weights 1/(deg+1) on an irregular graph are of this form: their spectrum is real and the
    symmetric solvers, which converge on slowly mixing graphs, apply.
    """
    diagonal = W.diagonal()
    if (diagonal <= 0).any():
        return W, False
    scale = 1.0 / np.sqrt(diagonal)
    balanced = W.copy()
    balanced.data *= scale[row_indices(W)] / scale[W.indices]
    return (balanced, True) if is_symmetric(balanced) else (W, False)


def _members(labels: np.ndarray, count: int) -> list[np.ndarray]:
    """The node indices of each component, from connected_components' labels."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=count))[:-1])


def _top_two_moduli(block: sparse.csr_array, symmetric: bool, radius: float) -> np.ndarray:
    """The two largest |eigenvalue|s of an irreducible block (one for a 1 x 1 block) whose spectral
    radius is at most ``radius``."""
    if block.shape[0] <= DENSE_SPECTRAL_LIMIT:
        dense = block.toarray()
        eigenvalues = np.linalg.eigvalsh(dense) if symmetric else np.linalg.eigvals(dense)
        return np.sort(np.abs(eigenvalues))[-2:]
    return _symmetric_top_two(block, radius) if symmetric else _general_top_two(block)


def _start(n: int) -> np.ndarray:
    """A fixed ARPACK start vector, so every process (and every run) gets the same digits."""
    return np.random.default_rng(0).standard_normal(n)


def _symmetric_top_two(W: sparse.csr_array, radius: float) -> np.ndarray:
    """sqrt of the two largest eigenvalues of W^2: W^2 folds lambda_N onto the top end of the spectrum,
    so one Lanczos run at one end gives max(|lambda_2|, |lambda_N|)."""
    n = W.shape[0]
    squared = LinearOperator((n, n), matvec=lambda x: W @ (W @ x), dtype=np.float64)
    try:
        values = eigsh(squared, k=2, which="LA", tol=0, maxiter=ARPACK_RESTARTS, v0=_start(n),
                       return_eigenvectors=False)
    except ArpackError:  # ArpackNoConvergence included
        values = _shift_invert_top_two_of_square(W, radius)
    moduli = np.sqrt(np.clip(np.sort(values), 0.0, None))
    return np.full(2, moduli[-1]) if _is_bipartite(W) else moduli


def _shift_invert_top_two_of_square(W: sparse.csr_array, radius: float) -> np.ndarray:
    """The two largest eigenvalues of W^2 for a slowly mixing W (ring, line, torus), whose top end is
    too tightly clustered for plain Lanczos: eigenvalues of (W^2 - s^2 I)^-1 = ((W - sI)(W + sI))^-1
    for s just above the spectral radius are well separated, and both factors keep W's sparsity."""
    n = W.shape[0]
    log.info("slow mixing: shift-invert on sparse LU factors of the %d x %d mixing matrix...", n, n)
    shift = radius * (1.0 + SHIFT)
    identity = sparse.csc_array(sparse.identity(n))
    try:
        below, above = splu(sparse.csc_array(W - shift * identity)), splu(sparse.csc_array(W + shift * identity))
        inverse = LinearOperator((n, n), matvec=lambda x: below.solve(above.solve(x)), dtype=np.float64)
        mu = eigsh(inverse, k=2, which="LM", tol=0, maxiter=ARPACK_RESTARTS, v0=_start(n), return_eigenvectors=False)
    except (ArpackError, RuntimeError) as exc:  # ArpackNoConvergence is an ArpackError; splu raises RuntimeError
        return _not_converged(n, exc)
    return shift**2 + 1.0 / mu


def _general_top_two(W: sparse.csr_array) -> np.ndarray:
    """The two largest |eigenvalue|s of a non-symmetric W (e.g. uniform weights on an irregular graph)."""
    n = W.shape[0]
    try:
        values = eigs(W, k=2, which="LM", tol=0, maxiter=ARPACK_RESTARTS, v0=_start(n), return_eigenvectors=False)
    except ArpackError as exc:
        return _not_converged(n, exc)
    return np.sort(np.abs(values))


def _not_converged(n: int, exc: Exception) -> np.ndarray:
    warnings.warn(
        f"the sparse eigensolver did not converge on the {n} x {n} mixing matrix ({exc}); rho and the "
        "spectral gap are unknown (NaN); metropolis or max_degree mixing gives a symmetric W, which converges",
        UserWarning,
        stacklevel=2,
    )
    return np.full(2, np.nan)


def _is_bipartite(W: sparse.csr_array) -> bool:
    """A zero diagonal and a 2-colouring of W's graph make -W similar to W: then -rho is an eigenvalue
    too, and the top modulus counts twice (W^2 has it twice, which Lanczos may find only once)."""
    if W.diagonal().any():
        return False
    depth = csgraph.shortest_path(W, unweighted=True, indices=0, directed=False)
    rows, columns = W.nonzero()
    return bool(((depth[rows] + depth[columns]) % 2 == 1).all())


def server_mixing_steps(client_weights: Sequence[float]) -> list[sparse.csr_array]:
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
    nodes, clients = np.arange(n), np.arange(1, n)
    hub = np.zeros(n - 1, dtype=np.int64)
    up = from_entries(np.concatenate([hub, clients]), np.concatenate([clients, clients]),
                      np.concatenate([weights / weights.sum(), np.ones(n - 1)]), n)
    down = from_entries(nodes, np.zeros(n, dtype=np.int64), np.ones(n), n)
    return [up, down]


def compose(steps: Sequence[sparse.csr_array]) -> sparse.csr_array:
    """A whole round's mixing: the product of its steps in the order they are applied (one step is
    returned as it is)."""
    combined = steps[0]
    for W in steps[1:]:
        combined = canonical(W @ combined)  # a sparse product leaves its column indices unsorted
    return combined
