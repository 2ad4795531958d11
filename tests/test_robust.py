"""Robust mixing of LoRA factors: gauge fixing keeps products and removes rotations and scalings, Gram
distances equal explicit products, every rule is gauge-invariant and exact on identical inputs, clipping
without a radius is plain mixing bit for bit, outliers move robust rules little, and each attack has
its defining property. Pure tensor maths, seeded, mostly float64."""

from __future__ import annotations

import math

import pytest
import torch

from p2p_fedrot.errors import ConfigError
from p2p_fedrot.exact import weighted_sum
from p2p_fedrot.peers.factors import FactorLayout, layout_of_state
from p2p_fedrot.robust import attacks
from p2p_fedrot.robust.distance import product_sq_distances, row_distances
from p2p_fedrot.robust.gauge import align_to, balance, full_rank_modules, gauge_fix
from p2p_fedrot.robust.rules import RULES, adaptive_tau, cs_plus_tau, make_rule

SHAPES = ((4, 6, 5), (4, 7, 6))  # per module (r, d_in, d_out)
SCALINGS = (2.0, 0.5)
RULE_SETTINGS = {
    "plain": {"rule": "plain"},
    "clip": {"rule": "clip", "tau": "auto"},
    "clip_fixed": {"rule": "clip", "tau": 3.0},
    "cs_plus": {"rule": "cs_plus", "b": 1},
    "trimmed_mean": {"rule": "trimmed_mean", "b": 1},
    "median": {"rule": "median"},
}


def make_layout(head: int = 5, dense: bool = False) -> FactorLayout:
    state = {}
    for m, (r, d_in, d_out) in enumerate(SHAPES):
        state[f"base.l{m}.lora_A.default.weight"] = torch.empty(r, d_in)
        state[f"base.l{m}.lora_B.default.weight"] = torch.empty(d_out, r)
    state["base.head.weight"] = torch.empty(head)
    dense_shapes = {f"l{m}": (d_out, d_in) for m, (_, d_in, d_out) in enumerate(SHAPES)} if dense else None
    return layout_of_state(state, {f"l{m}": s for m, s in enumerate(SCALINGS)}, "base.", dense_shapes)


LAYOUT = make_layout()


def peers(n: int, seed: int, noise: float = 0.3, dtype: torch.dtype = torch.float64,
          layout: FactorLayout = LAYOUT) -> list[torch.Tensor]:
    """n buffers around a shared one (noise 0: identical)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(layout.numel, generator=g, dtype=torch.float64)
    return [(base + noise * torch.randn(layout.numel, generator=g, dtype=torch.float64)).to(dtype) for _ in range(n)]


def weights(n: int, seed: int) -> list[float]:
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    return (w / w.sum()).tolist()


def products(flat: torch.Tensor, layout: FactorLayout = LAYOUT) -> list[torch.Tensor]:
    return [s * (B.double() @ A.double()) for s, A, B in zip(layout.scalings, layout.a_views(flat), layout.b_views(flat))]


def rest(flat: torch.Tensor, layout: FactorLayout = LAYOUT) -> torch.Tensor:
    return flat[layout.segments["head"][0]:]


def relative_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative difference of the products (per module) and the head of two buffers."""
    gaps = [float((p - q).norm() / p.norm()) for p, q in zip(products(x), products(y))]
    return max(gaps + [float((rest(x) - rest(y)).norm() / rest(x).norm())])


def moved(x: torch.Tensor, y: torch.Tensor) -> float:
    """Distance of two buffers in product space plus head."""
    return float(row_distances([x, y], 0, LAYOUT, (True,) * len(SHAPES))[1])


def rotations(r: int, count: int, g: torch.Generator) -> torch.Tensor:
    """Random orthogonal r x r matrices, reflections included."""
    return torch.linalg.qr(torch.randn(count, r, r, generator=g, dtype=torch.float64)).Q


def rotated(flat: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(R^T A, B R) with a random orthogonal R per module: the same adapter."""
    out = flat.clone()
    for A, B in zip(LAYOUT.a_views(out), LAYOUT.b_views(out)):
        R = rotations(A.shape[0], 1, g)[0].to(A.dtype)
        A.copy_(R.T @ A)
        B.copy_(B @ R)
    return out


def rule_of(key: str, gauge: bool = True):
    return make_rule({**RULE_SETTINGS[key], "gauge": gauge})


# --- balance, alignment, gauge fixing ---------------------------------------------------------------


def test_balance_keeps_products_and_equalizes_norms_per_direction_over_a_batch() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 2, 4, 9, generator=g, dtype=torch.float64)
    B = 0.01 * torch.randn(3, 2, 6, 4, generator=g, dtype=torch.float64)  # unbalanced, as early in training
    A2, B2 = balance(A, B)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=0, atol=1e-14)
    torch.testing.assert_close(B2.norm(dim=-2), A2.norm(dim=-1), rtol=1e-12, atol=0)
    assert A2.dtype == A.dtype and A2.shape == A.shape and B2.shape == B.shape


def test_balance_with_repeated_singular_values_and_tiny_layers() -> None:
    g = torch.Generator().manual_seed(1)
    q_b = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64)).Q
    q_a = torch.linalg.qr(torch.randn(9, 4, generator=g, dtype=torch.float64)).Q
    root = torch.tensor([2.0, 2.0, 1.0, 0.5], dtype=torch.float64).sqrt()
    R = rotations(4, 1, g)[0]
    A, B = R.T @ (root[:, None] * q_a.T), 3.0 * (q_b * root) @ R  # singular values 6, 6, 3, 1.5
    A2, B2 = balance(A, B)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=0, atol=1e-13)
    torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1), rtol=1e-12, atol=0)
    A3, B3 = balance(torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64))
    assert A3.shape == (4, 2) and B3.shape == (3, 4)  # rank 2 at most: the last directions are zero
    assert torch.count_nonzero(A3[2:]) == 0 and torch.count_nonzero(B3[:, 2:]) == 0


def test_balance_of_a_zero_product_is_zero_and_gauge_fixing_leaves_such_a_module_as_sent() -> None:
    """B = 0 (LoRA init) has product 0, whose balanced form is all zero: a receiver in that state has
    no frame, so the module keeps every sender's factors as they are (the A it needs to learn)."""
    A2, B2 = balance(torch.randn(4, 6, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64))
    assert torch.count_nonzero(A2) == 0 and torch.count_nonzero(B2) == 0
    xs = peers(3, seed=2)
    LAYOUT.b_views(xs[0])[0].zero_()
    fixed, frame = gauge_fix(xs, 0, LAYOUT)
    assert full_rank_modules(xs[0], LAYOUT) == frame.fixed == (False, True)
    for x, f in zip(xs, fixed):
        assert torch.equal(LAYOUT.a_views(x)[0], LAYOUT.a_views(f)[0])
        assert torch.equal(LAYOUT.b_views(x)[0], LAYOUT.b_views(f)[0])
        assert not torch.equal(LAYOUT.a_views(x)[1], LAYOUT.a_views(f)[1])


def test_a_zero_sender_is_balanced_to_zero_when_the_receiver_has_a_frame() -> None:
    xs = peers(2, seed=3)
    LAYOUT.b_views(xs[1])[0].zero_()
    fixed, _ = gauge_fix(xs, 0, LAYOUT)
    assert torch.count_nonzero(LAYOUT.a_views(fixed[1])[0]) == 0 and torch.count_nonzero(LAYOUT.b_views(fixed[1])[0]) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gauge_fixing_keeps_products_and_the_head(dtype: torch.dtype) -> None:
    xs = peers(5, seed=4, dtype=dtype)
    fixed, frame = gauge_fix(xs, 2, LAYOUT)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for x, f in zip(xs, fixed):
        assert f.dtype == dtype
        assert all(float((p - q).norm() / p.norm()) < tolerance for p, q in zip(products(x), products(f)))
        assert torch.equal(rest(x), rest(f))
    assert torch.equal(frame.restore(fixed[2]), xs[2])  # the receiver's own result is its own buffer


def test_gauge_fixed_rows_depend_on_the_products_only() -> None:
    """Rotated and rescaled copies of every pair, the receiver's included, fix to the same factors."""
    g = torch.Generator().manual_seed(5)
    xs = peers(4, seed=5)
    ys = [attacks.gauge_scale(rotated(x, g), c, LAYOUT) for x, c in zip(xs, (0.2, 5.0, 1.0, 3.0))]
    for f, h in zip(gauge_fix(xs, 1, LAYOUT)[0], gauge_fix(ys, 1, LAYOUT)[0]):
        torch.testing.assert_close(f, h, rtol=0, atol=1e-10)


def test_alignment_undoes_any_orthogonal_change_reflections_included() -> None:
    g = torch.Generator().manual_seed(6)
    A, B = balance(torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64))
    R = rotations(4, 3, g)
    R[0, :, 0] *= -1  # a reflection: one direction's sign, as an SVD may choose it
    A2, B2 = align_to(R.mT @ A, B @ R, A, B)
    torch.testing.assert_close(A2, A.expand_as(A2), rtol=0, atol=1e-12)
    torch.testing.assert_close(B2, B.expand_as(B2), rtol=0, atol=1e-12)


# --- distances --------------------------------------------------------------------------------------


def test_gram_distances_equal_explicit_products() -> None:
    g = torch.Generator().manual_seed(7)
    A_ref, B_ref = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    As, Bs = torch.randn(5, 4, 9, generator=g, dtype=torch.float64), torch.randn(5, 6, 4, generator=g, dtype=torch.float64)
    explicit = (Bs @ As - B_ref @ A_ref).square().sum((-2, -1))
    torch.testing.assert_close(product_sq_distances(A_ref, B_ref, As, Bs), explicit, rtol=1e-10, atol=0)
    assert float(product_sq_distances(A_ref, B_ref, A_ref[None], B_ref[None])[0]) < 1e-10 * float(explicit.mean())


def test_row_distances_add_scaled_products_head_and_dense_deltas() -> None:
    layout = make_layout(dense=True)
    xs = peers(4, seed=8, layout=layout)
    layout.b_views(xs[1])[0].zero_()  # receiver 1's module 0 has no frame: its factors' distance counts
    got = row_distances(xs, 1, layout, full_rank_modules(xs[1], layout))
    for j, x in enumerate(xs):
        a0, b0 = layout.a_views(x)[0] - layout.a_views(xs[1])[0], layout.b_views(x)[0] - layout.b_views(xs[1])[0]
        square = float(a0.square().sum() + b0.square().sum())
        square += float((products(x, layout)[1] - products(xs[1], layout)[1]).square().sum())
        square += float((rest(x, layout) - rest(xs[1], layout)).square().sum())
        assert math.isclose(float(got[j]), math.sqrt(square), rel_tol=1e-10, abs_tol=1e-12)
    assert float(got[1]) == 0.0


# --- every rule: gauge invariance, exactness --------------------------------------------------------


@pytest.mark.parametrize("key", RULE_SETTINGS)
def test_every_rule_is_invariant_to_rotating_each_senders_factors(key: str) -> None:
    g = torch.Generator().manual_seed(9)
    xs, w = peers(7, seed=9), weights(7, seed=9)
    rule = rule_of(key)
    out = rule(list(zip(w, xs)), 2, LAYOUT)
    out_rotated = rule(list(zip(w, [rotated(x, g) for x in xs])), 2, LAYOUT)
    assert relative_gap(out, out_rotated) < 1e-5
    if key != "plain":  # the rule did something the plain mix does not
        assert relative_gap(out, rule_of("plain")(list(zip(w, xs)), 2, LAYOUT)) > 1e-3


@pytest.mark.parametrize("c", [0.2, 5.0])
@pytest.mark.parametrize("key", RULE_SETTINGS)
def test_every_rule_is_invariant_to_rescaling_each_senders_factors(key: str, c: float) -> None:
    xs, w = peers(7, seed=10), weights(7, seed=10)
    scaled = [attacks.gauge_scale(x, c ** (-1) ** j, LAYOUT) for j, x in enumerate(xs)]  # c and 1/c in turn
    rule = rule_of(key)
    assert relative_gap(rule(list(zip(w, xs)), 3, LAYOUT), rule(list(zip(w, scaled)), 3, LAYOUT)) < 1e-5


@pytest.mark.parametrize("key", ["plain", "clip"])
def test_linear_rules_are_invariant_also_when_the_receiver_has_repeated_singular_values(key: str) -> None:
    g = torch.Generator().manual_seed(11)
    xs, w = peers(5, seed=11), weights(5, seed=11)
    for A, B in zip(LAYOUT.a_views(xs[0]), LAYOUT.b_views(xs[0])):
        q_a = torch.linalg.qr(torch.randn(A.shape[1], 4, generator=g, dtype=torch.float64)).Q
        q_b = torch.linalg.qr(torch.randn(B.shape[0], 4, generator=g, dtype=torch.float64)).Q
        root = torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64).sqrt()
        A.copy_(root[:, None] * q_a.T)
        B.copy_(q_b * root)
    rule = rule_of(key)
    ys = [rotated(xs[0], g)] + xs[1:]
    assert relative_gap(rule(list(zip(w, xs)), 0, LAYOUT), rule(list(zip(w, ys)), 0, LAYOUT)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gauge", [True, False])
@pytest.mark.parametrize("key", RULE_SETTINGS)
def test_every_rule_returns_identical_inputs_exactly(key: str, gauge: bool, dtype: torch.dtype) -> None:
    """With weights whose running sum of copies is exact (1/8, 1/8, 1/4, 1/2): plain is exact.weighted_sum,
    which rounds sums such as 3x/8, and clipping must be plain bit for bit when nothing is clipped."""
    x = peers(1, seed=12, dtype=dtype)[0]
    out = rule_of(key, gauge)([(w, x.clone()) for w in (0.125, 0.125, 0.25, 0.5)], 2, LAYOUT)
    assert torch.equal(out, x)


@pytest.mark.parametrize("key", ["trimmed_mean", "median"])
def test_receiver_relative_and_order_rules_return_identical_inputs_exactly_for_any_weights(key: str) -> None:
    x = peers(1, seed=13)[0]
    out = rule_of(key)([(w, x.clone()) for w in weights(6, seed=13)], 1, LAYOUT)
    assert torch.equal(out, x)


@pytest.mark.parametrize("key", RULE_SETTINGS)
def test_every_rule_gives_the_same_bits_every_time(key: str) -> None:
    xs, w = peers(6, seed=14), weights(6, seed=14)
    rule = rule_of(key)
    assert torch.equal(rule(list(zip(w, xs)), 4, LAYOUT), rule(list(zip(w, [x.clone() for x in xs])), 4, LAYOUT))


@pytest.mark.parametrize("gauge", [True, False])
def test_clipping_with_an_infinite_radius_is_plain_mixing_bit_for_bit(gauge: bool) -> None:
    for dtype in (torch.float64, torch.float32):
        inputs = list(zip(weights(6, seed=15), peers(6, seed=15, dtype=dtype)))
        plain = make_rule({"rule": "plain", "gauge": gauge})(inputs, 2, LAYOUT)
        assert torch.equal(make_rule({"rule": "clip", "tau": math.inf, "gauge": gauge})(inputs, 2, LAYOUT), plain)
        assert torch.equal(make_rule({"rule": "cs_plus", "b": 0, "gauge": gauge})(inputs, 2, LAYOUT), plain)


def test_plain_mixing_without_gauge_fixing_is_the_weighted_sum() -> None:
    inputs = list(zip(weights(5, seed=16), peers(5, seed=16, dtype=torch.float32)))
    assert torch.equal(make_rule({"rule": "plain", "gauge": False})(inputs, 0, LAYOUT), weighted_sum(inputs))


# --- the rules' own definitions ---------------------------------------------------------------------


def test_adaptive_radius_is_the_second_largest_neighbour_distance() -> None:
    assert adaptive_tau([1.0, 5.0, 3.0, 2.0]) == 3.0
    assert adaptive_tau([2.0]) == 2.0 and adaptive_tau([]) == math.inf


def test_cs_plus_clips_twice_the_byzantine_weight() -> None:
    distances, uniform = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1 / 6] * 6
    assert cs_plus_tau(distances, uniform, 0, 1) == 3.0  # the 2 farthest clipped to the 3rd largest
    assert cs_plus_tau(distances, uniform, 0, 2) == 1.0
    assert cs_plus_tau(distances, uniform, 0, 3) == 0.0  # nothing left unclipped: the receiver keeps its own
    assert cs_plus_tau(distances, uniform, 0, 0) == math.inf
    heavy = [0.4, 0.1, 0.1, 0.1, 0.1, 0.2]  # the heaviest neighbour (0.2) is the one assumed Byzantine
    assert cs_plus_tau(distances, heavy, 0, 1) == 2.0  # cumulative 0.4, 0.5, 0.6 <= 1 - 0.4


def test_clip_moves_each_far_neighbour_to_the_radius() -> None:
    """Without gauge fixing and with a zero receiver (no frame: factor distances), d_j = ||x_j||."""
    xs = [torch.zeros(LAYOUT.numel, dtype=torch.float64)] + peers(3, seed=17, noise=1.0)
    w = [0.25] * 4
    tau = 0.5 * min(float(x.norm()) for x in xs[1:])
    got = make_rule({"rule": "clip", "tau": tau, "gauge": False})(list(zip(w, xs)), 0, LAYOUT)
    torch.testing.assert_close(got, sum(0.25 * x * tau / x.norm() for x in xs[1:]), rtol=1e-12, atol=0)


def test_trimmed_mean_drops_extremes_per_coordinate_and_always_keeps_the_receiver() -> None:
    xs, w = peers(6, seed=18, noise=1.0), weights(6, seed=18)
    xs[0] = xs[0] + 100.0  # the receiver is the largest everywhere and still counts
    got = make_rule({"rule": "trimmed_mean", "b": 1, "gauge": False})(list(zip(w, xs)), 0, LAYOUT)
    for k in (0, 7, LAYOUT.numel - 1):
        values = sorted((float(x[k]), j) for j, x in enumerate(xs[1:], start=1))[1:-1]
        kept = [(w[0], float(xs[0][k]))] + [(w[j], v) for v, j in values]
        assert math.isclose(float(got[k]), sum(a * v for a, v in kept) / sum(a for a, _ in kept), rel_tol=1e-12)


def test_weighted_median_takes_the_value_at_half_the_weight_and_the_midpoint_on_a_tie() -> None:
    xs = [torch.full((LAYOUT.numel,), v, dtype=torch.float64) for v in (3.0, 1.0, 2.0, 4.0)]
    even = make_rule({"rule": "median", "gauge": False})([(0.25, x) for x in xs], 0, LAYOUT)
    assert torch.equal(even, torch.full_like(even, 2.5))  # the two middles' mean, not torch.median's lower one
    heavy = make_rule({"rule": "median", "gauge": False})(list(zip([0.1, 0.1, 0.2, 0.6], xs)), 0, LAYOUT)
    assert torch.equal(heavy, torch.full_like(heavy, 4.0))


# --- robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["scaled", "sign_flip"])
@pytest.mark.parametrize("key", ["clip", "cs_plus", "trimmed_mean", "median"])
def test_one_outlier_moves_robust_rules_far_less_than_plain_mixing(key: str, attack: str) -> None:
    xs = peers(9, seed=19, noise=0.002)
    attacked = xs[:8] + [attacks.scaled(xs[8], 100.0) if attack == "scaled" else attacks.sign_flip(xs[8])]
    w = [1 / 9] * 9

    def shift(rule) -> float:
        return moved(rule(list(zip(w, xs)), 0, LAYOUT), rule(list(zip(w, attacked)), 0, LAYOUT))

    assert shift(rule_of(key)) < 0.1 * shift(rule_of("plain"))


def test_gauge_fixing_alone_defeats_the_scaling_attack() -> None:
    xs, w = peers(8, seed=20, noise=0.1), [0.125] * 8
    attacked = xs[:7] + [attacks.gauge_scale(xs[7], 5.0, LAYOUT)]
    fixed = make_rule({"rule": "plain"})
    assert relative_gap(fixed(list(zip(w, xs)), 0, LAYOUT), fixed(list(zip(w, attacked)), 0, LAYOUT)) < 1e-5
    unfixed = make_rule({"rule": "plain", "gauge": False})
    assert relative_gap(unfixed(list(zip(w, xs)), 0, LAYOUT), unfixed(list(zip(w, attacked)), 0, LAYOUT)) > 0.1


# --- settings ----------------------------------------------------------------------------------------


def test_every_rule_is_registered_and_settings_are_checked() -> None:
    assert sorted(RULES) == ["clip", "cs_plus", "median", "plain", "trimmed_mean"]
    assert make_rule({"rule": "clip"}).tau is None and make_rule({"rule": "clip", "tau": 2}).tau == 2.0
    bad = [({"rule": "mean"}, "robust.rule"), ({"rule": "clip", "b": 1}, "robust.b"),
           ({"rule": "clip", "tau": 0}, "robust.tau"), ({"rule": "clip", "tau": "big"}, "robust.tau"),
           ({"rule": "cs_plus", "b": -1}, "robust.b"), ({"rule": "trimmed_mean", "b": 1.5}, "robust.b"),
           ({"rule": "median", "gauge": "yes"}, "robust.gauge"), ({}, "robust.rule")]
    for settings, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_rule(settings)


def test_rules_need_the_receivers_own_full_buffer() -> None:
    inputs = list(zip([0.5, 0.5], peers(2, seed=21)))
    with pytest.raises(ValueError, match="own"):
        make_rule({"rule": "clip"})(inputs, None, LAYOUT)
    with pytest.raises(ValueError, match="full buffers"):
        make_rule({"rule": "clip"})([(w, x[:-1]) for w, x in inputs], 0, LAYOUT)


# --- attacks -----------------------------------------------------------------------------------------


def test_gauge_scale_keeps_every_product_and_the_head() -> None:
    x = peers(1, seed=22)[0]
    for c in (0.2, 5.0, -1.0):
        y = attacks.gauge_scale(x, c, LAYOUT)
        assert all(torch.allclose(p, q, rtol=1e-14, atol=0) for p, q in zip(products(x), products(y)))
        assert torch.equal(rest(x), rest(y))
        assert not torch.equal(LAYOUT.a_views(x)[0], LAYOUT.a_views(y)[0])


def test_simple_attacks() -> None:
    x = peers(1, seed=23)[0]
    assert torch.equal(attacks.sign_flip(x), -x) and torch.equal(attacks.scaled(x, 3.0), 3.0 * x)
    draws = [attacks.gaussian(x, 0.5, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert 0.4 < float((draws[0] - x).std()) < 0.6


def test_alie_and_ipm_follow_the_honest_statistics() -> None:
    honest = peers(5, seed=24)
    stacked = torch.stack(honest)
    torch.testing.assert_close(attacks.alie(honest, 0.0), stacked.mean(0), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(attacks.alie(honest, 1.5), stacked.mean(0) - 1.5 * stacked.std(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attacks.ipm(honest, 0.1), -0.1 * stacked.mean(0), rtol=1e-14, atol=1e-14)


def test_dissensus_with_eps_one_cancels_the_receivers_plain_mixing() -> None:
    xs = peers(4, seed=25)  # receiver 0, honest 1 and 2, Byzantine 3
    w = [0.4, 0.2, 0.1, 0.3]
    byzantine = attacks.dissensus(xs[0], list(zip(w[1:3], xs[1:3])), w[3], 1.0)
    mixed = weighted_sum(list(zip(w, xs[:3] + [byzantine])))
    torch.testing.assert_close(mixed, xs[0], rtol=0, atol=1e-13)
    pushed = attacks.dissensus(xs[0], list(zip(w[1:3], xs[1:3])), w[3], 2.0)
    honest_step = weighted_sum(list(zip(w[1:3], [x - xs[0] for x in xs[1:3]])))
    torch.testing.assert_close(weighted_sum(list(zip(w, xs[:3] + [pushed]))) - xs[0], -honest_step, rtol=1e-12, atol=1e-12)
