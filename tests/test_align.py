"""Soft Procrustes rotation: keeps B A, is a proper rotation, and attains the Procrustes optimum."""

from __future__ import annotations

import pytest
import torch

from p2p_fedrot.align import align_modules, align_pair, soft_rotation

R_, D_IN, D_OUT = 8, 64, 48


def factors(seed: int, r: int = R_, d_in: int = D_IN, d_out: int = D_OUT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)


def random_rotation(r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def rotation_used(A: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Recover R from A2 = R^T A (A has full row rank)."""
    return (A2 @ torch.linalg.pinv(A)).T


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_rotation_keeps_the_product_and_is_proper(side: str, lam: float) -> None:
    A, B = factors(0)
    A_ref, B_ref = factors(1)
    A2, B2 = align_pair(A, B, A_ref, B_ref, side, lam)
    assert float((B2 @ A2 - B @ A).abs().max() / (B @ A).abs().max()) < 1e-5
    R = rotation_used(A, A2)
    torch.testing.assert_close(R.T @ R, torch.eye(R_), atol=1e-5, rtol=0)
    assert abs(float(torch.det(R)) - 1.0) < 1e-4


def test_product_error_below_1e_minus_5_on_unit_scale_factors() -> None:
    A, B = factors(2)
    A, B = A / A.norm(), B / B.norm()
    A_ref, B_ref = factors(3)
    for side in ("A", "B"):
        A2, B2 = align_pair(A, B, A_ref, B_ref, side, 0.7)
        assert float((B2 @ A2 - B @ A).abs().max()) < 1e-5


def test_lam_zero_is_the_identity() -> None:
    M = torch.randn(5, R_, R_)
    assert torch.equal(soft_rotation(M, 0.0), torch.eye(R_).expand(5, R_, R_))
    A, B = factors(0)
    A2, B2 = align_pair(A, B, *factors(1), "A", 0.0)
    assert torch.equal(A2, A) and torch.equal(B2, B)


@pytest.mark.parametrize("side", ["A", "B"])
def test_lam_one_attains_the_procrustes_optimum(side: str) -> None:
    A, B = factors(4)
    A_ref, B_ref = factors(5)
    A2, B2 = align_pair(A, B, A_ref, B_ref, side, 1.0)

    def error(Q: torch.Tensor) -> float:
        return float((Q.T @ A - A_ref).norm()) if side == "A" else float((B @ Q - B_ref).norm())

    best = float((A2 - A_ref).norm()) if side == "A" else float((B2 - B_ref).norm())
    g = torch.Generator().manual_seed(9)
    assert best <= error(torch.eye(R_)) + 1e-4
    for _ in range(300):
        assert best <= error(random_rotation(R_, g)) + 1e-4


def test_det_fix_on_a_reflection_case() -> None:
    """A_ref is a reflection of A: the unconstrained optimum has det -1; we must return a rotation."""
    A, B = factors(6)
    D = torch.eye(R_)
    D[-1, -1] = -1.0
    A_ref = D @ A
    M = (A @ A_ref.T)[None]
    u, _, vh = torch.linalg.svd(M)
    assert torch.det(u @ vh) < 0  # the unconstrained Procrustes answer is a reflection
    R = soft_rotation(M, 1.0)[0]
    assert abs(float(torch.det(R)) - 1.0) < 1e-4
    u_fixed = u[0].clone()
    u_fixed[:, -1] = -u_fixed[:, -1]
    torch.testing.assert_close(R, u_fixed @ vh[0], atol=1e-5, rtol=0)
    A2, _ = align_pair(A, B, A_ref, None, "A", 1.0)
    g = torch.Generator().manual_seed(1)
    best = float((A2 - A_ref).norm())
    assert all(best <= float((random_rotation(R_, g).T @ A - A_ref).norm()) + 1e-4 for _ in range(200))


def test_zero_reference_or_zero_B_falls_back_to_identity() -> None:
    A, B = factors(7)
    A2, B2 = align_pair(A, B, torch.zeros_like(A), None, "A", 1.0)
    torch.testing.assert_close(A2, A, atol=0, rtol=0)
    A3, B3 = align_pair(A, torch.zeros_like(B), None, B, "B", 0.5)  # B = 0 at LoRA init
    assert torch.isfinite(A3).all() and torch.equal(A3, A) and torch.all(B3 == 0)


def test_batched_equals_per_module_with_mixed_shapes() -> None:
    shapes = [(8, 64, 48), (8, 32, 32), (4, 16, 24), (8, 64, 48)]
    mods = [factors(10 + k, *s) for k, s in enumerate(shapes)]
    refs = [factors(20 + k, *s) for k, s in enumerate(shapes)]
    for side in ("A", "B"):
        ref_list = [ra if side == "A" else rb for ra, rb in refs]
        As, Bs = align_modules([a for a, _ in mods], [b for _, b in mods], ref_list, side, 0.4)
        for (A, B), (ra, rb), A2, B2 in zip(mods, refs, As, Bs):
            a1, b1 = align_pair(A, B, ra, rb, side, 0.4)
            torch.testing.assert_close(A2, a1, atol=1e-6, rtol=0)
            torch.testing.assert_close(B2, b1, atol=1e-6, rtol=0)


def test_soft_rotation_moves_monotonically_toward_the_reference() -> None:
    A, B = factors(30)
    A_ref = random_rotation(R_, torch.Generator().manual_seed(3)).T @ A + 0.1 * factors(31)[0]
    errors = [float((align_pair(A, B, A_ref, None, "A", lam)[0] - A_ref).norm()) for lam in (0.0, 0.5, 1.0)]
    assert errors[2] <= errors[1] <= errors[0]


def test_bf16_inputs_keep_their_dtype() -> None:
    A, B = factors(40)
    A_ref, _ = factors(41)
    A2, B2 = align_pair(A.bfloat16(), B.bfloat16(), A_ref.bfloat16(), None, "A", 0.4)
    assert A2.dtype == B2.dtype == torch.bfloat16
    assert float((B2.float() @ A2.float() - B.bfloat16().float() @ A.bfloat16().float()).abs().max()) < 0.5


def test_bad_inputs_are_named() -> None:
    A, B = factors(0)
    with pytest.raises(ValueError, match="side must be"):
        align_pair(A, B, A, None, "C", 0.4)
    with pytest.raises(ValueError, match="lam must be in"):
        align_pair(A, B, A, None, "A", 1.5)
    with pytest.raises(ValueError, match="module 0"):
        align_pair(A, B, A[:, :5], None, "A", 0.4)
