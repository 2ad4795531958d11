"""Communication graphs: who gossips with whom, from a catalogue name, a YAML, a graph file or a graph.

Every process builds the graph on its own from (spec, peers, seed), so all random choices are
drawn from ``seed`` (and the round, for time-varying schedules) and never from global state.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import networkx as nx
import numpy as np
import yaml
from scipy import sparse

from ..errors import ConfigError
from ..io import atomic_write_png
from ..seeding import derive_seed
from .weights import is_doubly_stochastic, second_eigenvalue_modulus


def _catalogue_folder() -> Path:
    """The topology YAMLs: shipped inside an installed package, or at the top of a source checkout."""
    package = Path(__file__).resolve().parents[1]  # p2p_fedrot/, above graph/
    installed = package / "topologies"
    return installed if installed.is_dir() else package.parent / "topologies"


CATALOGUE = _catalogue_folder()
MAX_DRAWS = 100  # random graphs are redrawn (each draw its own derived seed) at most this often to get a connected one
GRAPH_READERS: dict[str, Callable[[str], nx.Graph]] = {
    ".edges": nx.read_edgelist,
    ".txt": nx.read_edgelist,
    ".adjlist": nx.read_adjlist,
    ".graphml": nx.read_graphml,
    ".gml": nx.read_gml,
}
YAML_SUFFIXES = (".yaml", ".yml")
ENTRY_KEYS = ("description", "generator", "params", "server")
# networkx keeps about 260 bytes per edge: the complete graph on 4,472 peers (10 million edges) takes
# 2.6 GB and ~16 s to build and describe, so larger catalogue graphs are refused before anything is built.
MAX_EDGES = 10_000_000
NOTICE_EDGES = 1_000_000  # building a graph this large takes seconds: say so first
DIAMETER_WORK_LIMIT = 5_000_000  # nodes x edges: all-pairs BFS for the diameter, about a second at this size
DRAW_MAX_PEERS = 1_000  # a drawing of more peers is unreadable and slow
DRAW_MAX_EDGES = 100_000  # matplotlib draws about 30,000 edges a second

log = logging.getLogger(__name__)


class TopologyError(ConfigError):
    """A topology spec or parameter is invalid; the message names the topology and the fix."""


@dataclass(frozen=True)
class Topology:
    """A named communication graph over peers 0..peers-1, fixed or changing with the round."""

    name: str
    peers: int
    server: bool
    static: bool
    params: dict
    graph_of_round: Callable[[int], nx.Graph] = field(repr=False, compare=False)

    def graph_at(self, round: int) -> nx.Graph:
        """The graph used in ``round`` (the same object every round for static topologies)."""
        if round < 0:
            raise TopologyError(f"topology '{self.name}': round must be >= 0, got {round}")
        return self.graph_of_round(round)


# ---------------------------------------------------------------- project-specific builders
# Static builders take (peers, seed, **params); schedules take (peers, seed, round, **params).


def star(peers: int, seed: int) -> nx.Graph:
    """Node 0 is the centre, linked to every other node."""
    return nx.star_graph(peers - 1)


def torus(peers: int, seed: int, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    """2-D periodic grid: node r*cols + c talks to its four neighbours (wrapping around)."""
    rows, cols = _torus_shape(peers, rows, cols)
    graph = nx.empty_graph(peers)
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            graph.add_edge(node, r * cols + (c + 1) % cols)
            graph.add_edge(node, ((r + 1) % rows) * cols + c)
    return graph


def _torus_shape(peers: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    """The most square rows x cols = peers, unless given.

    Both sides >= 3 give a 4-regular torus; when the peer count allows no such shape (8 = 2 x 4),
    a side of 2 is used, whose wrap-around coincides with the direct edge (a 3-regular graph).
    """
    if rows is None and cols is None:
        shapes = [(r, peers // r) for r in range(2, int(np.sqrt(peers)) + 1) if peers % r == 0]
        if not shapes:
            raise TopologyError(
                f"topology 'torus': {peers} peers do not factor into rows x cols with both >= 2; "
                "use e.g. 8, 9, 12 or 16 peers, or another topology such as ring"
            )
        return shapes[-1]
    rows = rows if rows is not None else _divide(peers, cols, "cols")
    cols = cols if cols is not None else _divide(peers, rows, "rows")
    if rows < 2 or cols < 2 or rows * cols != peers:
        raise TopologyError(
            f"topology 'torus': rows={rows} x cols={cols} must both be >= 2 and multiply to peers={peers}"
        )
    return rows, cols


def _divide(peers: int, size: int, key: str) -> int:
    if size < 1 or peers % size:
        raise TopologyError(f"topology 'torus': {key}={size} does not divide peers={peers}; pick a divisor")
    return peers // size


def exponential(peers: int, seed: int) -> nx.Graph:
    """Static exponential graph: i <-> i + 2^k mod N for every 2^k < N (O(log N) degree, fast mixing)."""
    graph = nx.empty_graph(peers)
    hop = 1
    while hop < peers:
        graph.add_edges_from((i, (i + hop) % peers) for i in range(peers))
        hop *= 2
    graph.remove_edges_from(nx.selfloop_edges(graph))
    return graph


def _first_connected(draw: Callable[[int], nx.Graph], seed: int) -> nx.Graph:
    """Redraw until connected, each draw from its own seed derived from (seed, attempt): with seed,
    seed+1, ... consecutive run seeds would land on the same graph whenever the first draw is
    disconnected. The last draw goes on to the connectivity check."""
    for attempt in range(MAX_DRAWS):
        graph = draw(derive_seed(seed, "graph draw", attempt))
        if nx.is_connected(graph):
            break
    return graph


def erdos_renyi(peers: int, seed: int, p: float = 0.3) -> nx.Graph:
    """G(n, p): each pair linked with probability p, redrawn until connected."""
    if not 0 < p <= 1:
        raise TopologyError(f"topology 'erdos_renyi': p must be in (0, 1], got {p}")
    return _first_connected(lambda s: nx.gnp_random_graph(peers, p, seed=s), seed)


def random_regular(peers: int, seed: int, d: int = 3) -> nx.Graph:
    """Random d-regular graph, redrawn until connected."""
    if not 0 <= d < peers or (peers * d) % 2:
        raise TopologyError(
            f"topology 'random_regular': need 0 <= d < peers and peers*d even, got d={d}, peers={peers}; "
            "change d (e.g. an even d works for any peers > d)"
        )
    return _first_connected(lambda s: nx.random_regular_graph(d, peers, seed=s), seed)


def barbell(peers: int, seed: int, bridge: int = 0) -> nx.Graph:
    """Two cliques of (peers - bridge) / 2 peers joined by a path through ``bridge`` peers (one edge
    for 0): the graph with the worst bottleneck for its density, where rules that are not relative to
    the receiver cut the two halves apart. Cliques 0..m-1 and m+bridge..N-1, path m-1, m, ..., m+bridge."""
    cliques = peers - bridge
    if bridge < 0 or cliques < 4 or cliques % 2:
        raise TopologyError(
            f"topology 'barbell': peers - bridge must be even and at least 4 (two cliques of 2 or more), got "
            f"peers={peers}, bridge={bridge}; use an even peer count with bridge 0, or change bridge"
        )
    return nx.barbell_graph(cliques // 2, bridge)


def edge_list(peers: int, seed: int, edges: list | None = None, path: str | None = None) -> nx.Graph:
    """An explicit edge list over peers 0..peers-1, given inline or as a networkx-readable graph file."""
    if (edges is None) == (path is None):
        raise TopologyError(
            "topology 'edges': give exactly one of 'edges' (a list of [u, v] pairs of peer ids) "
            "or 'path' (a graph file: " + ", ".join(GRAPH_READERS) + ")"
        )
    if path is not None:
        return _relabel(_read_graph_file(Path(path)), peers, f"graph file {path}")
    graph = nx.empty_graph(peers)
    for pair in edges:
        if not _is_peer_pair(pair, peers):
            raise TopologyError(
                f"topology 'edges': edge {pair!r} must be a pair of peer ids in 0..{peers - 1}"
            )
        graph.add_edge(*pair)
    return graph


def _is_peer_pair(pair: Any, peers: int) -> bool:
    return (
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < peers for v in pair)
    )


def random_matching(peers: int, seed: int, round: int) -> nx.Graph:
    """A fresh random perfect matching each round, drawn from (seed, round) so all processes agree."""
    if peers % 2:
        raise TopologyError(f"topology 'random_matching' needs an even number of peers, got {peers}")
    order = np.random.default_rng([seed, round]).permutation(peers)
    graph = nx.empty_graph(peers)
    graph.add_edges_from(zip(order[0::2].tolist(), order[1::2].tolist()))
    return graph


def one_peer_exponential(peers: int, seed: int, round: int) -> nx.DiGraph:
    """Directed: in round t peer i sends to i + 2^(t mod ceil(log2 N)) mod N (and so hears from one peer).

    With W = (I + P) / 2 per round, log2 N consecutive rounds of a power-of-two N average exactly (their
    product is the all-1/N matrix); for other N the hops still cycle through every 2^k < N, which mixes
    fast but never exactly.
    """
    if peers < 2:
        raise TopologyError(f"topology 'one_peer_exponential' needs at least 2 peers, got {peers}")
    hop = 2 ** (round % (peers - 1).bit_length())
    graph = nx.DiGraph()
    graph.add_nodes_from(range(peers))
    graph.add_edges_from((i, (i + hop) % peers) for i in range(peers))
    return graph


class _Builder(NamedTuple):
    make: Callable[..., nx.Graph]
    static: bool


BUILDERS: dict[str, _Builder] = {
    "star": _Builder(star, True),
    "torus": _Builder(torus, True),
    "exponential": _Builder(exponential, True),
    "erdos_renyi": _Builder(erdos_renyi, True),
    "random_regular": _Builder(random_regular, True),
    "barbell": _Builder(barbell, True),
    "edges": _Builder(edge_list, True),
    "random_matching": _Builder(random_matching, False),
    "one_peer_exponential": _Builder(one_peer_exponential, False),
}


# Edge counts known from (peers, params) before building, by generator name (catalogue and YAML alike).
EDGE_ESTIMATES: dict[str, Callable[[int, Mapping], float]] = {
    "complete_graph": lambda n, params: n * (n - 1) / 2,
    "cycle_graph": lambda n, params: n,
    "path_graph": lambda n, params: n - 1,
    "star": lambda n, params: n - 1,
    "torus": lambda n, params: 2 * n,
    "exponential": lambda n, params: n * (n - 1).bit_length(),
    "erdos_renyi": lambda n, params: params["p"] * n * (n - 1) / 2,
    "random_regular": lambda n, params: n * params["d"] / 2,
    "barbell": lambda n, params: (n - params["bridge"]) // 2 * ((n - params["bridge"]) // 2 - 1) + params["bridge"] + 1,
    "connected_watts_strogatz_graph": lambda n, params: n * (params["k"] // 2),
    "watts_strogatz_graph": lambda n, params: n * (params["k"] // 2),
    "random_matching": lambda n, params: n / 2,
    "one_peer_exponential": lambda n, params: n,
}


def estimated_edges(generator: str, peers: int, params: Mapping) -> float | None:
    """The edge count ``generator`` would produce, or None when it cannot be told without building."""
    estimate = EDGE_ESTIMATES.get(generator)
    try:
        return float(estimate(peers, params)) if estimate else None
    except (KeyError, TypeError, ValueError):  # a malformed parameter: the generator itself reports it
        return None


def _check_size(name: str, generator: str, peers: int, params: Mapping) -> None:
    """Refuse a graph over MAX_EDGES before building it; announce a large one (it takes seconds)."""
    edges = estimated_edges(generator, peers, params)
    if edges is None or not math.isfinite(edges):  # unknown, or a bad parameter the generator will name
        return
    if edges > MAX_EDGES:
        raise TopologyError(
            f"topology '{name}' with {peers} peers would have about {edges:,.0f} edges, over the limit of "
            f"{MAX_EDGES:,} (topology.MAX_EDGES); use fewer peers or a sparser graph "
            "(ring, torus, small_world, random_regular, or a smaller p, k or d)"
        )
    if edges >= NOTICE_EDGES:
        log.info("building %s on %d peers (~%.1f M edges)...", name, peers, edges / 1e6)


@contextmanager
def progress_to(stream: TextIO) -> Iterator[None]:
    """While active, write the notes on slow steps (large graphs, sparse eigensolvers) to ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("p2p-fedrot: %(message)s"))
    logger = logging.getLogger("p2p_fedrot")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---------------------------------------------------------------- resolving a spec


def available_topologies() -> list[str]:
    """Names of the catalogue entries (one YAML each in the top-level ``topologies/`` folder)."""
    return sorted(path.stem for path in CATALOGUE.glob("*.yaml"))


def _load_entry(path: Path) -> dict:
    """A topology YAML: generator, params, optional description and server flag."""
    try:
        entry = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"cannot read topology YAML {path}: {exc}") from exc
    if not isinstance(entry, dict) or "generator" not in entry:
        raise TopologyError(f"topology YAML {path} must be a mapping with at least a 'generator' key")
    unknown = set(entry) - set(ENTRY_KEYS)
    if unknown:
        raise TopologyError(
            f"topology YAML {path}: unknown keys {sorted(unknown)}; valid keys are {list(ENTRY_KEYS)}"
        )
    if not isinstance(entry.get("params") or {}, dict):
        raise TopologyError(f"topology YAML {path}: 'params' must be a mapping of generator parameters")
    return entry


def _catalogue_entry(name: str) -> dict:
    if name not in available_topologies():
        raise TopologyError(
            f"unknown topology {name!r}; available: {', '.join(available_topologies())}, "
            "or a path to a topology YAML or a graph file (" + ", ".join(GRAPH_READERS) + ")"
        )
    return _load_entry(CATALOGUE / f"{name}.yaml")


def _read_graph_file(path: Path) -> nx.Graph:
    reader = GRAPH_READERS.get(path.suffix.lower())
    if reader is None:
        raise TopologyError(f"graph file {path}: unsupported suffix; use one of {', '.join(GRAPH_READERS)}")
    if not path.is_file():
        raise TopologyError(f"graph file {path} not found")
    try:
        return reader(str(path))
    except Exception as exc:  # the readers raise many types (parse, XML, type errors)
        raise TopologyError(f"cannot parse graph file {path}: {exc}") from exc


def _node_order(node: Any) -> tuple:
    """Sort numeric labels by value ("10" after "9") and the rest as text."""
    try:
        return (0, int(node), "")
    except (TypeError, ValueError):
        return (1, 0, str(node))


def _relabel(graph: nx.Graph, peers: int, where: str) -> nx.Graph:
    """A simple undirected copy with nodes relabelled 0..n-1 in sorted order, checked against ``peers``."""
    if graph.number_of_nodes() != peers:
        raise TopologyError(
            f"{where} has {graph.number_of_nodes()} nodes but the run has peers={peers}; "
            "set peers to the graph's node count or use a graph with one node per peer"
        )
    mapping = {node: i for i, node in enumerate(sorted(graph.nodes, key=_node_order))}
    simple = nx.Graph()
    simple.add_nodes_from(range(peers))
    simple.add_edges_from((mapping[u], mapping[v]) for u, v in graph.edges() if u != v)
    return simple


def _generator(name: str) -> tuple[Callable[..., nx.Graph], bool, str | None]:
    """(function, static, name of its node-count argument) for a builder or a networkx generator."""
    if name in BUILDERS:
        return BUILDERS[name].make, BUILDERS[name].static, None
    function = getattr(nx, name, None)
    if not callable(function) or name.startswith("_"):
        raise TopologyError(
            f"unknown generator {name!r}; use one of {', '.join(BUILDERS)} "
            "or a networkx generator such as cycle_graph"
        )
    arguments = list(inspect.signature(function).parameters)
    return function, True, "n" if "n" in arguments else arguments[0]


def _parameters(function: Callable, size_argument: str | None) -> dict[str, inspect.Parameter]:
    """The parameters a user may set: everything but the peer count, seed, round and networkx plumbing."""
    fixed = {"peers", "seed", "round", size_argument, "create_using", "backend", "backend_kwargs"}
    return {
        name: parameter
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in fixed and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def _resolve_params(name: str, function: Callable, size_argument: str | None, given: Mapping) -> dict:
    """Given parameters checked against the generator's, with its defaults filled in."""
    valid = _parameters(function, size_argument)
    unknown = set(given) - set(valid)
    if unknown:
        raise TopologyError(
            f"topology '{name}': unknown parameter(s) {sorted(unknown)}; valid: {sorted(valid) or 'none'} "
            "(the peer count and seed come from the run config)"
        )
    missing = [key for key, p in valid.items() if p.default is inspect.Parameter.empty and key not in given]
    if missing:
        raise TopologyError(f"topology '{name}': missing parameter(s) {missing}")
    defaults = {key: p.default for key, p in valid.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **given}


def _call(
    name: str, function: Callable, size_argument: str | None, peers: int, seed: int, params: dict, **extra: int
) -> nx.Graph:
    """Run one generator and turn its failures into a TopologyError that names the topology."""
    if size_argument is None:
        args = {"peers": peers, "seed": seed, **extra}
    else:
        seeded = "seed" in inspect.signature(function).parameters
        args = {size_argument: peers, **({"seed": seed} if seeded else {})}
    try:
        graph = function(**args, **params)
    except TopologyError:
        raise
    except (nx.NetworkXException, ValueError, TypeError) as exc:
        raise TopologyError(f"topology '{name}' with {peers} peers and params {params} failed: {exc}") from exc
    if not isinstance(graph, nx.Graph):
        raise TopologyError(f"topology '{name}': generator {function.__name__} does not return a graph")
    return graph if _is_canonical(graph, peers) else _relabel(graph, peers, f"topology '{name}'")


def _is_canonical(graph: nx.Graph, peers: int) -> bool:
    """A generator's fresh simple graph on the ints 0..peers-1 in order, which needs no relabelled copy
    (for millions of edges the copy costs as much as the generator)."""
    return (
        type(graph) in (nx.Graph, nx.DiGraph)  # a directed builder (one_peer_exponential) stays directed
        and graph.number_of_nodes() == peers
        and all(type(node) is int and node == rank for rank, node in enumerate(graph))
        and nx.number_of_selfloops(graph) == 0
    )


def _from_entry(
    name: str, entry: dict, overrides: Mapping, peers: int, seed: int, allow_disconnected: bool
) -> Topology:
    """Build a catalogue or YAML entry, with ``overrides`` replacing its params."""
    function, static, size_argument = _generator(str(entry["generator"]))
    params = _resolve_params(name, function, size_argument, {**(entry.get("params") or {}), **overrides})
    _check_size(name, str(entry["generator"]), peers, params)
    if not static:
        def schedule(round: int) -> nx.Graph:
            return _call(name, function, None, peers, seed, params, round=round)

        schedule(0)  # surface bad parameters now rather than mid-run
        return Topology(name, peers, False, False, params, schedule)
    graph = _call(name, function, size_argument, peers, seed, params)
    return _static(name, graph, bool(entry.get("server", False)), params, allow_disconnected)


def _static(name: str, graph: nx.Graph, server: bool, params: dict, allow_disconnected: bool) -> Topology:
    """Check a fixed graph once (connectivity, server shape) and serve it every round."""
    peers = graph.number_of_nodes()
    if server and (peers < 2 or graph.number_of_edges() != peers - 1 or graph.degree(0) != peers - 1):
        raise TopologyError(
            f"topology '{name}': a server topology must be a star with hub 0 and at least one client"
        )
    if not allow_disconnected and not nx.is_connected(graph):
        raise TopologyError(
            f"topology '{name}' with {peers} peers is disconnected "
            f"({nx.number_connected_components(graph)} components), so the peers cannot reach consensus; "
            f"raise its density (e.g. p, k or d; random graphs are redrawn up to {MAX_DRAWS} times) "
            "or set allow_disconnected: true"
        )
    return Topology(name, peers, server, True, params, lambda round: graph)


def build_topology(spec: Any, peers: int, seed: int, allow_disconnected: bool = False) -> Topology:
    """Resolve ``spec`` (catalogue name, topology YAML, graph file, {name: ..., **overrides} or nx.Graph)."""
    if isinstance(peers, bool) or not isinstance(peers, int) or peers < 1:
        raise TopologyError(f"peers must be a positive integer, got {peers!r}")
    if isinstance(spec, nx.Graph):
        return _static("custom", _relabel(spec, peers, "the given graph"), False, {}, allow_disconnected)
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise TopologyError(
                f"topology mapping {dict(spec)} needs a 'name' key naming a catalogue topology"
            )
        overrides = {key: value for key, value in spec.items() if key != "name"}
        return _from_entry(spec["name"], _catalogue_entry(spec["name"]), overrides, peers, seed, allow_disconnected)
    if not isinstance(spec, (str, os.PathLike)):
        raise TopologyError(
            f"topology spec must be a name, a path, a mapping or a networkx graph, got {type(spec).__name__}"
        )
    if isinstance(spec, str) and spec in available_topologies():
        return _from_entry(spec, _catalogue_entry(spec), {}, peers, seed, allow_disconnected)
    path = Path(spec)
    if path.suffix.lower() in YAML_SUFFIXES:
        if not path.is_file():
            raise TopologyError(f"topology YAML {path} not found")
        return _from_entry(path.stem, _load_entry(path), {}, peers, seed, allow_disconnected)
    if path.suffix.lower() in GRAPH_READERS:
        graph = _relabel(_read_graph_file(path), peers, f"graph file {path}")
        return _static(path.stem, graph, False, {"path": str(path)}, allow_disconnected)
    return _from_entry(str(spec), _catalogue_entry(str(spec)), {}, peers, seed, allow_disconnected)


# ---------------------------------------------------------------- reporting


def topology_stats(graph: nx.Graph, W: np.ndarray | sparse.sparray) -> dict:
    """Size, degrees, diameter and the spectral numbers of W (dense or sparse), as plain JSON-ready values.

    A statistic too costly for the graph's size (the diameter) or that the eigensolver could not
    settle (rho) is null, with the reason under "skipped" (a key present only then).
    """
    n = graph.number_of_nodes()
    if n == 0 or np.shape(W) != (n, n):
        raise TopologyError(
            f"topology_stats: need a non-empty graph and an N x N mixing matrix, "
            f"got {n} nodes and W of shape {np.shape(W)}"
        )
    edges = graph.number_of_edges()
    directed = graph.is_directed()  # then a peer's degree is the number of peers it hears from
    degrees = [degree for _, degree in (graph.in_degree() if directed else graph.degree())]
    connected = nx.is_strongly_connected(graph) if directed else nx.is_connected(graph)
    skipped: dict[str, str] = {}
    diameter = None
    if connected and n * edges > DIAMETER_WORK_LIMIT:
        skipped["diameter"] = (
            f"all-pairs BFS over {n} nodes x {edges} edges is above {DIAMETER_WORK_LIMIT:,} steps "
            "(topology.DIAMETER_WORK_LIMIT)"
        )
    elif connected:
        diameter = nx.diameter(graph)
    rho = second_eigenvalue_modulus(W)
    known = math.isfinite(rho)
    if not known:
        skipped["rho"] = "the sparse eigensolver did not converge, so rho and spectral_gap are unknown"
    stats = {
        "nodes": n,
        "edges": edges,
        "directed": directed,
        "connected": connected,
        "degree_min": int(min(degrees)),
        "degree_max": int(max(degrees)),
        "diameter": diameter,
        "rho": rho if known else None,
        "spectral_gap": 1.0 - rho if known else None,
        "doubly_stochastic": is_doubly_stochastic(W),
    }
    return {**stats, "skipped": skipped} if skipped else stats


def edge_pairs(graph: nx.Graph) -> list[list[int]]:
    """The edges as sorted [u, v] pairs ([sender, receiver] for a directed graph), for records and digests."""
    if graph.is_directed():
        return sorted([int(u), int(v)] for u, v in graph.edges())
    return sorted(sorted((int(u), int(v))) for u, v in graph.edges())


def check_drawable(graph: nx.Graph) -> None:
    """Refuse a graph too large to draw legibly in seconds, before any other work is spent on it."""
    peers, edges = graph.number_of_nodes(), graph.number_of_edges()
    if peers > DRAW_MAX_PEERS or edges > DRAW_MAX_EDGES:
        raise TopologyError(
            f"cannot draw a graph of {peers} peers and {edges} edges: drawings are limited to "
            f"{DRAW_MAX_PEERS:,} peers and {DRAW_MAX_EDGES:,} edges; leave out --png or use fewer peers"
        )


def draw_topology(graph: nx.Graph, path: str | os.PathLike, title: str = "") -> None:
    """Save a PNG of the graph on a circle (deterministic layout), written atomically."""
    check_drawable(graph)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    layout = nx.circular_layout(sorted(graph.nodes))
    nx.draw_networkx(graph, pos=layout, ax=axes, node_color="#8ecae6", node_size=300, font_size=8)
    axes.set_title(title)
    axes.set_axis_off()
    atomic_write_png(figure, path)
