import warnings

import networkx as nx
import numpy as np
import pytest

from p2p_fedrot.mixing import (
    SCHEMES,
    MixingError,
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


@pytest.mark.parametrize("name", GRAPHS)
def test_metropolis_is_symmetric_and_doubly_stochastic(name: str) -> None:
    W = mixing_matrix(GRAPHS[name], "metropolis")
    assert W.dtype == np.float64 and W.shape == (len(GRAPHS[name]),) * 2
    assert is_symmetric(W) and is_doubly_stochastic(W)


def test_metropolis_weights_by_hand() -> None:
    W = mixing_matrix(nx.path_graph(3))  # degrees 1, 2, 1
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(W, expected)


@pytest.mark.parametrize("name", GRAPHS)
def test_max_degree_is_doubly_stochastic(name: str) -> None:
    W = mixing_matrix(GRAPHS[name], "max_degree")
    assert is_symmetric(W) and is_doubly_stochastic(W)


def test_uniform_on_irregular_graph_is_row_stochastic_only_and_warns() -> None:
    with pytest.warns(UserWarning, match="not doubly stochastic"):
        W = mixing_matrix(GRAPHS["lollipop"], "uniform")
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    assert (W >= 0).all() and not is_doubly_stochastic(W)


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
    np.testing.assert_allclose(W, np.full((6, 6), 1 / 6))
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
    assert W.tolist() == [[1.0]] and spectral_gap(W) == 1.0


def test_server_steps_give_every_node_the_weighted_client_average() -> None:
    x = np.array([[100.0, -1.0], [1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])  # hub value is discarded
    up, down = server_mixing_steps([1, 2, 1])
    mixed = down @ (up @ x)
    expected = np.array([(1 * 1 + 2 * 2 + 1 * 4) / 4, (1 * 10 + 2 * 20 + 1 * 40) / 4])  # [2.25, 22.5]
    np.testing.assert_allclose(mixed, np.tile(expected, (4, 1)))
    np.testing.assert_allclose(up.sum(axis=1), 1.0)
    np.testing.assert_allclose(down.sum(axis=1), 1.0)
    assert up[0, 0] == 0 and (np.diag(up)[1:] == 1).all()


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
