"""Soft Procrustes rotation: keeps B A, is a proper rotation, attains the Procrustes optimum, falls back safely."""

from __future__ import annotations

import pytest
import torch

from p2p_fedrot.methods.procrustes import align_modules, align_pair, fit_rotations, misfit, rotate, soft_rotation

R_, D_IN, D_OUT = 8, 64, 64
LAMS = (0.0, 0.3, 0.5, 1.0)
SIDES = ("A", "B", "joint")


def factors(seed: int, r: int = R_, d_in: int = D_IN, d_out: int = D_OUT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)


def random_rotations(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    """n random r x r rotations (det +1), drawn in one batched call."""
    q, _ = torch.linalg.qr(torch.randn(n, r, r, generator=g))
    q[..., 0] *= torch.linalg.det(q).sign()[:, None]
    return q


def cross(A: torch.Tensor, B: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor], side: str) -> torch.Tensor:
    """M of the fitted side: A A_ref^T, B^T B_ref, or their sum for joint."""
    return (A @ refs[0].T if side != "B" else 0) + (B.T @ refs[1] if side != "A" else 0)


def fit_error(A: torch.Tensor, B: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor], side: str,
              Q: torch.Tensor) -> torch.Tensor:
    """How far rotating by Q (or each of a batch of Q's) leaves the fitted side (both factors for joint)
    from its reference."""
    a2 = (Q.mT @ A - refs[0]).square().sum((-2, -1)) if side != "B" else 0.0
    b2 = (B @ Q - refs[1]).square().sum((-2, -1)) if side != "A" else 0.0
    return torch.as_tensor(a2 + b2).sqrt()


def pick(refs: tuple[torch.Tensor, torch.Tensor], side: str) -> torch.Tensor:
    return refs[0] if side == "A" else refs[1]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("lam", LAMS)
def test_rotation_keeps_the_product(side: str, lam: float) -> None:
    A, B = factors(0)
    refs = factors(1)
    A2, B2 = align_pair(A, B, *refs, side, lam)
    assert float((B2 @ A2 - B @ A).abs().max()) < 1e-5
    R = soft_rotation(cross(A, B, refs, side)[None], lam)[0]
    torch.testing.assert_close(A2, R.T @ A, atol=1e-6, rtol=0)
    torch.testing.assert_close(B2, B @ R, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam", LAMS)
def test_rotations_are_orthogonal_with_det_plus_one(lam: float) -> None:
    M = torch.randn(64, R_, R_, generator=torch.Generator().manual_seed(2))
    R = soft_rotation(M, lam)
    assert R.dtype == torch.float32 and R.shape == M.shape
    torch.testing.assert_close(R.transpose(-1, -2) @ R, torch.eye(R_).expand_as(R), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64), atol=1e-5, rtol=0)


def test_lam_zero_is_exactly_the_identity() -> None:
    M = torch.randn(5, R_, R_)
    assert torch.equal(soft_rotation(M, 0.0), torch.eye(R_).expand(5, R_, R_))
    A, B = factors(0)
    for side in SIDES:
        A2, B2 = align_pair(A, B, *factors(1), side, 0.0)
        assert torch.equal(A2, A) and torch.equal(B2, B)


@pytest.mark.parametrize("side", SIDES)
def test_lam_one_attains_the_procrustes_optimum(side: str) -> None:
    A, B = factors(4)
    refs = factors(5)
    A2, B2 = align_pair(A, B, *refs, side, 1.0)
    best = fit_error(A2, B2, refs, side, torch.eye(R_))
    assert best < fit_error(A, B, refs, side, torch.eye(R_))
    others = random_rotations(300, R_, torch.Generator().manual_seed(9))
    assert best <= fit_error(A, B, refs, side, others).min() + 1e-4


def test_det_fix_on_a_reflection_case() -> None:
    """A_ref is a reflection of A: the unconstrained optimum has det -1; we must return the best rotation."""
    A, B = factors(6)
    D = torch.eye(R_)
    D[-1, -1] = -1.0
    A_ref = D @ A
    M = (A @ A_ref.T)[None]
    u, _, vh = torch.linalg.svd(M.double())
    assert torch.det(u @ vh) < 0  # the unconstrained Procrustes answer is a reflection
    R = soft_rotation(M, 1.0)[0]
    assert abs(float(torch.det(R)) - 1.0) < 1e-5
    u_fixed = u[0].clone()
    u_fixed[:, -1] = -u_fixed[:, -1]
    torch.testing.assert_close(R, (u_fixed @ vh[0]).float(), atol=1e-5, rtol=0)
    A2, _ = align_pair(A, B, A_ref, None, "A", 1.0)
    best = float((A2 - A_ref).norm())
    others = random_rotations(300, R_, torch.Generator().manual_seed(1))
    assert best <= fit_error(A, B, (A_ref, B), "A", others).min() + 1e-4


def test_zero_reference_or_zero_B_falls_back_to_identity() -> None:
    A, B = factors(7)
    A_ref, B_ref = factors(8)
    zero_B = torch.zeros_like(B)  # B = 0 at LoRA init
    cases = [
        (A, B, torch.zeros_like(A), None, "A"),
        (A, B, None, torch.zeros_like(B), "B"),
        (A, zero_B, None, B_ref, "B"),
        (A, zero_B, None, torch.zeros_like(B), "B"),
    ]
    for a, b, ra, rb, side in cases:
        for lam in (0.5, 1.0):
            A2, B2 = align_pair(a, b, ra, rb, side, lam)
            assert torch.equal(A2, a) and torch.equal(B2, b)
    assert torch.equal(soft_rotation(torch.zeros(3, R_, R_), 0.5), torch.eye(R_).expand(3, R_, R_))


def test_reference_orthogonal_to_the_factor_counts_as_zero() -> None:
    """M that is only rounding noise next to the factors' size would give an arbitrary rotation."""
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(3)))[0].T
    A, B = basis[:R_], factors(9)[1]
    A_ref = basis[R_:2 * R_] + 1e-9 * A
    A2, B2 = align_pair(A, B, A_ref, None, "A", 1.0)
    assert torch.equal(A2, A) and torch.equal(B2, B)


def test_identity_fallback_is_per_batch_element() -> None:
    M = torch.randn(4, R_, R_, generator=torch.Generator().manual_seed(11))
    M[1] = 0.0
    M[2, 0, 0] = float("nan")
    for lam in (0.5, 1.0):
        R = soft_rotation(M, lam)
        assert torch.isfinite(R).all()
        assert torch.equal(R[1], torch.eye(R_)) and torch.equal(R[2], torch.eye(R_))
        for k in (0, 3):
            torch.testing.assert_close(R[k], soft_rotation(M[k:k + 1], lam)[0], atol=1e-6, rtol=0)
            assert not torch.allclose(R[k], torch.eye(R_))


def test_failed_svd_falls_back_only_for_that_element(monkeypatch: pytest.MonkeyPatch) -> None:
    svd = torch.linalg.svd
    poisoned = 1234.5

    def flaky_svd(X: torch.Tensor, *args, **kwargs):
        if (X[..., 0, 0] == poisoned).any():
            raise torch.linalg.LinAlgError("did not converge")
        return svd(X, *args, **kwargs)

    M = torch.randn(3, R_, R_, generator=torch.Generator().manual_seed(12))
    expected = soft_rotation(M, 0.5)
    M[1, 0, 0] = poisoned
    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    R = soft_rotation(M, 0.5)
    assert torch.equal(R[1], torch.eye(R_))
    torch.testing.assert_close(R[[0, 2]], expected[[0, 2]], atol=1e-6, rtol=0)


def test_batched_equals_per_module_with_mixed_shapes_and_ranks() -> None:
    shapes = [(8, 64, 48), (8, 32, 32), (4, 16, 24), (8, 64, 48), (4, 40, 8)]
    mods = [factors(10 + k, *s) for k, s in enumerate(shapes)]
    refs = [factors(20 + k, *s) for k, s in enumerate(shapes)]
    As, Bs = [a for a, _ in mods], [b for _, b in mods]
    copies = [t.clone() for t in As + Bs]
    for side in ("A", "B"):
        new_As, new_Bs = align_modules(As, Bs, [pick(ref, side) for ref in refs], side, 0.4)
        for (A, B), ref, A2, B2 in zip(mods, refs, new_As, new_Bs):
            a1, b1 = align_pair(A, B, *ref, side, 0.4)
            torch.testing.assert_close(A2, a1, atol=1e-6, rtol=0)
            torch.testing.assert_close(B2, b1, atol=1e-6, rtol=0)
            assert not torch.equal(A2, A)
    assert all(torch.equal(t, c) for t, c in zip(As + Bs, copies))  # inputs untouched


def test_joint_recovers_rotated_copies_and_reduces_to_side_A_against_a_zero_B() -> None:
    A, B = factors(50)
    Q = random_rotations(1, R_, torch.Generator().manual_seed(50))[0]
    A2, B2 = align_pair(Q.T @ A, B @ Q, A, B, "joint", 1.0)
    torch.testing.assert_close(A2, A, atol=1e-5, rtol=0)
    torch.testing.assert_close(B2, B, atol=1e-5, rtol=0)
    A_ref = factors(51)[0]  # round 0: the reference's B is still 0, so joint fits A alone
    joint = align_pair(A, B, A_ref, torch.zeros_like(B), "joint", 0.5)
    side_A = align_pair(A, B, A_ref, None, "A", 0.5)
    assert all(torch.equal(x, y) for x, y in zip(joint, side_A))


def test_batched_fit_runs_one_svd_per_rank_over_inputs_and_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several peers' copies of every module (leading batch dimension) against one broadcast reference."""
    shapes = [(8, 64, 48), (4, 16, 24), (8, 32, 32)]
    n = 3
    batches = [[factors(60 + 10 * k + j, *shape) for j in range(n)] for k, shape in enumerate(shapes)]
    As = [torch.stack([a for a, _ in batch]) for batch in batches]
    Bs = [torch.stack([b for _, b in batch]) for batch in batches]
    refs = [factors(90 + k, *shape) for k, shape in enumerate(shapes)]
    A_refs, B_refs = [a for a, _ in refs], [b.clone() for _, b in refs]
    B_refs[1] = torch.zeros_like(B_refs[1])  # a zero reference in one module of the batch
    svd, calls = torch.linalg.svd, []
    monkeypatch.setattr(torch.linalg, "svd", lambda X, *a, **k: calls.append(X.shape) or svd(X, *a, **k))
    for side in SIDES:
        calls.clear()
        Rs = fit_rotations(As, Bs, A_refs, B_refs, side, 1.0)
        assert sorted(calls) == [(n, 4, 4), (2 * n, 8, 8)]
        new_As, new_Bs = rotate(As, Bs, Rs)
        for m, (A, B, R) in enumerate(zip(As, Bs, Rs)):
            assert R.shape == (n, A.shape[1], A.shape[1])
            for j in range(n):
                alone = fit_rotations([A[j]], [B[j]], [A_refs[m]], [B_refs[m]], side, 1.0)[0]
                torch.testing.assert_close(R[j], alone, atol=1e-6, rtol=0)
                torch.testing.assert_close(new_As[m][j], alone.T @ A[j], atol=1e-6, rtol=0)
                torch.testing.assert_close(new_Bs[m][j], B[j] @ alone, atol=1e-6, rtol=0)
        assert (side == "B") == torch.equal(Rs[1], torch.eye(4).expand(n, 4, 4))


def test_misfit_sums_the_fitted_side_over_modules_per_batch_element() -> None:
    mods = [factors(k, 4, 6, 5) for k in range(2)]
    refs = [factors(10 + k, 4, 6, 5) for k in range(2)]
    As = [torch.stack([a, 2 * a]) for a, _ in mods]
    Bs = [torch.stack([b, 3 * b]) for _, b in mods]
    A_refs, B_refs = [a for a, _ in refs], [b for _, b in refs]
    for side in SIDES:
        got = misfit(As, Bs, A_refs, B_refs, side)
        for j in range(2):
            expected = sum(float(fit_error(A[j], B[j], ref, side, torch.eye(4))) ** 2
                           for A, B, ref in zip(As, Bs, refs))
            assert got.shape == (2,) and abs(float(got[j]) - expected) < 1e-4 * expected


@pytest.mark.parametrize("side", SIDES)
def test_error_shrinks_as_lam_grows(side: str) -> None:
    A, B = factors(30)
    g = torch.Generator().manual_seed(3)
    Q = random_rotations(1, R_, g)[0]
    noise_A, noise_B = factors(31)
    refs = (Q.T @ A + 0.3 * noise_A, B @ Q + 0.3 * noise_B)
    errors = []
    for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
        A2, B2 = align_pair(A, B, *refs, side, lam)
        errors.append(float(fit_error(A2, B2, refs, side, torch.eye(R_))))
        R = soft_rotation(cross(A, B, refs, side)[None], lam)[0]
        torch.testing.assert_close(R.T @ R, torch.eye(R_), atol=1e-5, rtol=0)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_bf16_keeps_dtype_and_fits_in_fp32() -> None:
    A, B = (t.bfloat16() for t in factors(40))
    A_ref = factors(41)[0].bfloat16()
    A2, B2 = align_pair(A, B, A_ref, None, "A", 0.4)
    assert A2.dtype == B2.dtype == torch.bfloat16
    # the same values in fp32 give the same rotation: nothing was computed in bf16 before rounding the result
    A32, B32 = align_pair(A.float(), B.float(), A_ref.float(), None, "A", 0.4)
    assert torch.equal(A2, A32.bfloat16()) and torch.equal(B2, B32.bfloat16())
    product = B.float() @ A.float()
    assert float((B2.float() @ A2.float() - product).abs().max() / product.abs().max()) < 2e-2


def test_bad_inputs_are_named() -> None:
    A, B = factors(0)
    with pytest.raises(ValueError, match="side must be one of .*'A', 'B'"):
        align_pair(A, B, A, None, "C", 0.4)  # type: ignore[arg-type]
    for lam in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lam must be in"):
            align_pair(A, B, A, None, "A", lam)
        with pytest.raises(ValueError, match="lam must be in"):
            soft_rotation(torch.eye(R_), lam)
    with pytest.raises(ValueError, match=r"module 1: .*A \(8, 64\), B \(64, 8\), A reference \(8, 5\)"):
        align_modules([A, A], [B, B], [A, A[:, :5]], "A", 0.4)
    with pytest.raises(ValueError, match="module 0: .*B reference None"):
        align_pair(A, B, A, None, "B", 0.4)
    with pytest.raises(ValueError, match="module 0: .*B \\(64, 4\\)"):
        align_pair(A, B[:, :4], A, None, "A", 0.4)
    with pytest.raises(ValueError, match="one of each per module"):
        align_modules([A], [B, B], [A], "A", 0.4)
    with pytest.raises(ValueError, match="square"):
        soft_rotation(torch.zeros(3, 4), 0.4)
