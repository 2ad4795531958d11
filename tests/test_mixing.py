import logging
import warnings

import networkx as nx
import numpy as np
import pytest
from scipy import sparse

from p2p_fedrot.graph import weights as mixing
from p2p_fedrot.graph.weights import (
    DENSE_SPECTRAL_LIMIT,
    SCHEMES,
    MixingError,
    compose,
    is_doubly_stochastic,
    is_symmetric,
    mixing_matrix,
    second_eigenvalue_modulus,
    server_mixing_steps,
    spectral_gap,
)

GRAPHS = {
    "ring": nx.cycle_graph(8),
    "star": nx.star_graph(7),
    "lollipop": nx.lollipop_graph(4, 3),
    "erdos_renyi": nx.gnp_random_graph(12, 0.4, seed=3),
}


def assert_canonical_csr(W: sparse.csr_array) -> None:
    """What gossip relies on: CSR float64, columns sorted within each row, every stored entry nonzero."""
    assert isinstance(W, sparse.csr_array) and W.dtype == np.float64
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
    assert (np.diff(W.indices)[np.diff(rows) == 0] > 0).all() and (W.data != 0).all()


@pytest.mark.parametrize("name", GRAPHS)
def test_metropolis_is_symmetric_and_doubly_stochastic(name: str) -> None:
    W = mixing_matrix(GRAPHS[name], "metropolis")
    assert W.shape == (len(GRAPHS[name]),) * 2
    assert_canonical_csr(W)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    assert is_symmetric(W) and is_doubly_stochastic(W)


def test_metropolis_weights_by_hand() -> None:
    W = mixing_matrix(nx.path_graph(3))  # degrees 1, 2, 1
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(W.toarray(), expected)


def textbook_metropolis(graph: nx.Graph) -> np.ndarray:
    """W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 - the row's other weights added by ascending j."""
    n = graph.number_of_nodes()
    W = np.zeros((n, n))
    for i in range(n):
        for j in sorted(graph[i]):
            W[i, j] = 1.0 / (1.0 + max(graph.degree(i), graph.degree(j)))
        off_diagonal = 0.0
        for j in sorted(graph[i]):
            off_diagonal += W[i, j]
        W[i, i] = 1.0 - off_diagonal
    return W


def test_metropolis_equals_the_textbook_weights_bit_for_bit_whatever_the_edge_order() -> None:
    graph = nx.lollipop_graph(4, 3)  # degrees 3, 3, 3, 4, 2, 2, 1
    W = mixing_matrix(graph)
    np.testing.assert_array_equal(W.toarray(), textbook_metropolis(graph))
    shuffled = nx.empty_graph(7)
    edges = list(graph.edges())
    shuffled.add_edges_from((v, u) for u, v in reversed(edges))
    again = mixing_matrix(shuffled)
    for array in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(again, array), getattr(W, array))


def dense_reference(graph: nx.Graph, scheme: str) -> np.ndarray:
    """The weights of each scheme written densely from the adjacency matrix."""
    adjacency = nx.to_numpy_array(graph, nodelist=range(len(graph)), weight=None)
    degree = adjacency.sum(axis=1)
    if scheme == "uniform":
        return (adjacency + np.eye(len(degree))) / (degree + 1.0)[:, None]
    scale = 1.0 + (np.maximum.outer(degree, degree) if scheme == "metropolis" else degree.max())
    off_diagonal = adjacency / scale
    return off_diagonal + np.diag(1.0 - off_diagonal.sum(axis=1))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("graph", [nx.path_graph(7), nx.star_graph(5), GRAPHS["erdos_renyi"], nx.empty_graph(3)])
def test_every_scheme_matches_its_dense_formula(graph: nx.Graph, scheme: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uniform on irregular graphs
        W = mixing_matrix(graph, scheme)
    assert_canonical_csr(W)
    np.testing.assert_allclose(W.toarray(), dense_reference(graph, scheme), rtol=0, atol=1e-15)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", GRAPHS)
def test_max_degree_is_doubly_stochastic(name: str) -> None:
    W = mixing_matrix(GRAPHS[name], "max_degree")
    assert is_symmetric(W) and is_doubly_stochastic(W)


def test_uniform_on_irregular_graph_is_row_stochastic_only_and_warns() -> None:
    with pytest.warns(UserWarning, match="not doubly stochastic"):
        W = mixing_matrix(GRAPHS["lollipop"], "uniform")
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    assert (W.data > 0).all() and not is_doubly_stochastic(W)


def test_uniform_on_regular_graph_is_doubly_stochastic_and_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W = mixing_matrix(nx.cycle_graph(6), "uniform")
    assert is_doubly_stochastic(W)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 16])
def test_ring_spectral_gap_matches_closed_form(n: int) -> None:
    moduli = [abs(1 + 2 * np.cos(2 * np.pi * k / n)) / 3 for k in range(1, n)]
    assert spectral_gap(mixing_matrix(nx.cycle_graph(n))) == pytest.approx(1 - max(moduli), abs=1e-12)


def test_complete_graph_averages_in_one_step() -> None:
    W = mixing_matrix(nx.complete_graph(6))
    np.testing.assert_allclose(W.toarray(), np.full((6, 6), 1 / 6))
    assert spectral_gap(W) == pytest.approx(1.0, abs=1e-12)


def test_disconnected_graph_has_no_gap() -> None:
    graph = nx.union(nx.cycle_graph(3), nx.cycle_graph(3), rename=("a", "b"))
    W = mixing_matrix(nx.convert_node_labels_to_integers(graph))
    assert second_eigenvalue_modulus(W) == pytest.approx(1.0)


def test_nonsymmetric_matrix_uses_general_eigenvalues() -> None:
    W = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])  # directed ring, eigenvalues 0.5 + 0.5 w^k
    assert second_eigenvalue_modulus(W) == pytest.approx(abs(0.5 + 0.5 * np.exp(2j * np.pi / 3)))


def test_single_node() -> None:
    W = mixing_matrix(nx.empty_graph(1))
    assert W.toarray().tolist() == [[1.0]] and spectral_gap(W) == 1.0


def test_server_steps_give_every_node_the_weighted_client_average() -> None:
    x = np.array([[100.0, -1.0], [1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])  # hub value is discarded
    up, down = server_mixing_steps([1, 2, 1])
    mixed = down @ (up @ x)
    expected = np.array([(1 * 1 + 2 * 2 + 1 * 4) / 4, (1 * 10 + 2 * 20 + 1 * 40) / 4])  # [2.25, 22.5]
    np.testing.assert_allclose(mixed, np.tile(expected, (4, 1)))
    np.testing.assert_allclose(up.sum(axis=1), 1.0)
    np.testing.assert_allclose(down.sum(axis=1), 1.0)
    assert up[0, 0] == 0 and (up.diagonal()[1:] == 1).all()
    assert_canonical_csr(up)
    assert_canonical_csr(down)


def test_the_server_round_is_exact_sample_weighted_averaging() -> None:
    counts = [3.0, 0.0, 1.0, 4.0]  # a client with no examples sends nothing
    up, down = server_mixing_steps(counts)
    round_W = compose([up, down])
    assert_canonical_csr(round_W)
    np.testing.assert_array_equal(round_W.toarray(), np.tile([0.0, 3 / 8, 0.0, 1 / 8, 4 / 8], (5, 1)))
    assert up.nnz == 3 + 4 and compose([up]) is up  # hub row: 3 weighted clients; one step is returned as is


def test_compose_multiplies_sparse_steps_in_order() -> None:
    rng = np.random.default_rng(0)
    steps = [sparse.random_array((30, 30), density=0.1, format="csr", rng=rng) for _ in range(3)]
    product = compose(steps)
    assert_canonical_csr(product)
    np.testing.assert_allclose(product.toarray(), steps[2].toarray() @ steps[1].toarray() @ steps[0].toarray())


@pytest.mark.parametrize("weights, match", [([], "one weight per client"), ([1, -1], "nonnegative"),
                                            ([0, 0], "all zero"), ([[1, 2]], "one weight per client")])
def test_server_steps_reject_bad_weights(weights: list, match: str) -> None:
    with pytest.raises(MixingError, match=match):
        server_mixing_steps(weights)


def test_errors_are_clear() -> None:
    with pytest.raises(MixingError, match="metropolis, uniform, max_degree"):
        mixing_matrix(nx.cycle_graph(4), "laplacian")
    with pytest.raises(MixingError, match="no nodes"):
        mixing_matrix(nx.Graph())
    with pytest.raises(MixingError, match="0..2"):
        mixing_matrix(nx.relabel_nodes(nx.path_graph(3), {0: "a"}))
    with pytest.raises(MixingError, match="square"):
        spectral_gap(np.ones((2, 3)))
    assert SCHEMES == ("metropolis", "uniform", "max_degree")


# ---------------------------------------------------------------- large graphs: sparse W and ARPACK


def dense_rho(W: np.ndarray) -> float:
    eigenvalues = np.linalg.eigvalsh(W) if np.allclose(W, W.T, rtol=0, atol=1e-12) else np.linalg.eigvals(W)
    return float(np.sort(np.abs(eigenvalues))[-2])


LARGE = {  # just above DENSE_SPECTRAL_LIMIT, so second_eigenvalue_modulus takes the sparse path
    "ring": nx.cycle_graph(1200),
    "torus": nx.convert_node_labels_to_integers(nx.grid_2d_graph(30, 40, periodic=True)),
    "random_regular": nx.random_regular_graph(3, 1200, seed=0),
}


@pytest.fixture
def small_dense_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Send matrices of more than 100 peers to the sparse solvers, so dense references stay cheap."""
    monkeypatch.setattr(mixing, "DENSE_SPECTRAL_LIMIT", 100)
    return 100


def test_checks_take_dense_and_sparse_alike() -> None:
    for W in (mixing_matrix(GRAPHS["lollipop"]), mixing_matrix(nx.path_graph(5), "max_degree")):
        dense = W.toarray()
        assert is_symmetric(W) == is_symmetric(dense) and is_doubly_stochastic(W) == is_doubly_stochastic(dense)
        assert spectral_gap(W) == pytest.approx(spectral_gap(dense), abs=1e-12)


@pytest.mark.parametrize("name", LARGE)
def test_sparse_spectral_path_agrees_with_dense_eigvalsh(name: str, caplog: pytest.LogCaptureFixture) -> None:
    graph = LARGE[name]
    assert graph.number_of_nodes() > DENSE_SPECTRAL_LIMIT
    with caplog.at_level(logging.INFO, logger="p2p_fedrot"):
        W = mixing_matrix(graph)
        rho = second_eigenvalue_modulus(W)
    assert abs(rho - dense_rho(W.toarray())) < 1e-8
    assert "sparse eigensolver" in caplog.text
    # the ring's top eigenvalues are too clustered for plain Lanczos: it takes the shift-invert fallback
    assert ("shift-invert" in caplog.text) == (name == "ring")


def test_sparse_path_takes_dense_input_and_both_ends_of_the_spectrum(small_dense_limit: int) -> None:
    W = mixing_matrix(nx.cycle_graph(300)).toarray()  # a dense array above the limit goes sparse too
    assert second_eigenvalue_modulus(W) == pytest.approx(dense_rho(W), abs=1e-8)
    bipartite = nx.to_numpy_array(nx.cycle_graph(300)) / 2  # zero diagonal: eigenvalues 1 and -1
    assert second_eigenvalue_modulus(sparse.csr_array(bipartite)) == pytest.approx(1.0, abs=1e-12)
    two_rings = mixing_matrix(nx.disjoint_union(nx.cycle_graph(150), nx.cycle_graph(200)))
    assert spectral_gap(two_rings) == pytest.approx(0.0, abs=1e-12)  # eigenvalue 1 twice


def test_sparse_path_for_uniform_weights_on_an_irregular_graph(small_dense_limit: int) -> None:
    for graph in (nx.path_graph(300), nx.connected_watts_strogatz_graph(300, 4, 0.3, seed=1)):
        with pytest.warns(UserWarning, match="not doubly stochastic"):
            W = mixing_matrix(graph, "uniform")
        assert not is_symmetric(W)
        assert second_eigenvalue_modulus(W) == pytest.approx(dense_rho(W.toarray()), abs=1e-8)


def test_sparse_solver_that_does_not_converge_gives_nan_and_a_warning() -> None:
    n = 1200  # a directed ring: eigenvalues (1 + e^(2 pi i k / n)) / 2 crowd the unit circle near 1
    W = sparse.csr_array(0.5 * sparse.identity(n) + 0.5 * sparse.eye(n, k=1) + 0.5 * sparse.eye(n, k=1 - n))
    with pytest.warns(UserWarning, match="did not converge on the 1200 x 1200 mixing matrix"):
        assert np.isnan(second_eigenvalue_modulus(W))
