"""AdvantageFlow loss on hand-computed numbers, its convexity check and its minimiser."""

import pytest
import torch

from learner.objectives.advantage_flow import (
    advantage_flow_loss,
    advantage_flow_target,
    check_convexity,
)

# Two samples of two elements each, shaped (B, C, H, W) = (2, 1, 1, 2); γ = 1, λ = 0.5.
F = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 1, 1, 2)
X0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
FOLD = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 1, 1, 2)
FREF = torch.tensor([[2.0, 2.0], [0.0, 1.0]]).view(2, 1, 1, 2)
A = torch.tensor([1.0, -0.5])
GAMMA, LAM = 1.0, 0.5


def test_loss_hand_computed():
    # fm_0  = ((1−0)² + (2−0)²)/2 = 2.5     fm_1  = ((0−1)² + (0−1)²)/2 = 1.0
    # reg_0 = ((1−1)² + (2−0)²)/2 = 2.0     reg_1 = ((0−0)² + (0−2)²)/2 = 2.0
    # ref_0 = ((1−2)² + (2−2)²)/2 = 0.5     ref_1 = ((0−0)² + (0−1)²)/2 = 0.5
    # ℓ_0 = 1·2.5 + 1·2 + 0.5·0.5 = 4.75    ℓ_1 = −0.5·1 + 1·2 + 0.5·0.5 = 1.75
    losses, stats = advantage_flow_loss(F, X0, FOLD, FREF, A, gamma=GAMMA, lam=LAM)
    torch.testing.assert_close(losses, torch.tensor([4.75, 1.75]))
    assert float(stats["fm"]) == pytest.approx(1.75)  # (2.5 + 1)/2
    assert float(stats["rollout_reg"]) == pytest.approx(2.0)
    assert float(stats["ref_reg"]) == pytest.approx(0.5)
    assert float(stats["adv_mean"]) == pytest.approx(0.25)  # (1 − 0.5)/2
    assert float(stats["adv_std"]) == pytest.approx(0.75)  # population: sqrt((0.75² + 0.75²)/2)
    assert float(stats["neg_fraction"]) == pytest.approx(0.5)
    assert all(not s.requires_grad for s in stats.values())


def test_gradient_hand_computed():
    # ∂ℓ/∂f = (2/N)·[A(f − x0) + γ(f − f_old) + λ(f − f_ref)], N = 2:
    # sample 0: 1·(1, 2) + 1·(0, 2) + 0.5·(−1, 0) = (0.5, 4)
    # sample 1: −0.5·(−1, −1) + 1·(0, −2) + 0.5·(0, −1) = (0.5, −2)
    f = F.clone().requires_grad_(True)
    losses, _ = advantage_flow_loss(f, X0, FOLD, FREF, A, gamma=GAMMA, lam=LAM)
    losses.sum().backward()
    torch.testing.assert_close(f.grad, torch.tensor([[0.5, 4.0], [0.5, -2.0]]).view(2, 1, 1, 2))


def test_old_reference_and_advantages_get_no_gradient():
    fold, fref, a = (t.clone().requires_grad_(True) for t in (FOLD, FREF, A))
    losses, _ = advantage_flow_loss(F, X0, fold, fref, a, gamma=GAMMA, lam=LAM)
    assert not losses.requires_grad


def test_adaptive_norm_hand_computed():
    # scale_0 = sg(mean|f − x0|) = (1 + 2)/2 = 1.5    scale_1 = (1 + 1)/2 = 1.0
    # ℓ_0 = 4.75 / 1.5 = 19/6                        ℓ_1 = 1.75 / 1 = 1.75
    # the scale is a constant: gradients are the plain ones divided by it,
    # (0.5, 4)/1.5 = (1/3, 8/3) and (0.5, −2)/1 = (0.5, −2)
    f = F.clone().requires_grad_(True)
    losses, stats = advantage_flow_loss(f, X0, FOLD, FREF, A, gamma=GAMMA, lam=LAM, adaptive_norm=True)
    torch.testing.assert_close(losses, torch.tensor([19 / 6, 1.75]))
    losses.sum().backward()
    torch.testing.assert_close(f.grad, torch.tensor([[1 / 3, 8 / 3], [0.5, -2.0]]).view(2, 1, 1, 2))
    assert float(stats["fm"]) == pytest.approx(1.75)  # statistics are before normalisation


def test_adaptive_norm_floor():
    # sample 1 sits on x0 = (1, 1): mean|f − x0| = 0 → divisor 1e-5
    # reg_1 = ((1−0)² + (1−2)²)/2 = 1    ref_1 = ((1−0)² + (1−1)²)/2 = 0.5
    # ℓ_1 = (−0.5·0 + 1·1 + 0.5·0.5) / 1e-5 = 1.25e5
    f = torch.stack([F[0], X0[1]])
    losses, _ = advantage_flow_loss(f, X0, FOLD, FREF, A, gamma=GAMMA, lam=LAM, adaptive_norm=True)
    assert float(losses[1]) == pytest.approx(1.25e5, rel=1e-6)


def test_target_hand_computed():
    # sample 0: A + γ + λ = 2.5, f* = (1·(0, 0) + 1·(1, 0) + 0.5·(2, 2))/2.5 = (2, 1)/2.5 = (0.8, 0.4)
    # sample 1: A + γ + λ = 1.0, f* = −0.5·(1, 1) + 1·(0, 2) + 0.5·(0, 1) = (−0.5, 2):
    #   pushed away from x0 = (1, 1), past f_old = (0, 2)
    target = advantage_flow_target(X0, FOLD, FREF, A, GAMMA, LAM)
    torch.testing.assert_close(target, torch.tensor([[0.8, 0.4], [-0.5, 2.0]]).view(2, 1, 1, 2))
    # the gradient vanishes there
    f = target.clone().requires_grad_(True)
    advantage_flow_loss(f, X0, FOLD, FREF, A, gamma=GAMMA, lam=LAM)[0].sum().backward()
    torch.testing.assert_close(f.grad, torch.zeros_like(f))


def test_target_refuses_a_nonconvex_sample():
    with pytest.raises(ValueError, match="A \\+ γ \\+ λ must be > 0"):
        advantage_flow_target(X0, FOLD, FREF, torch.tensor([1.0, -1.5]), GAMMA, LAM)


def test_convexity_check():
    # γ + λ − A_max = 0.5 + 0 − 1 = −0.5 ≤ 0: some admissible A has no minimiser
    with pytest.raises(ValueError, match="γ \\+ λ − A_max > 0") as err:
        check_convexity(0.5, 0.0, 1.0)
    assert "γ=0.5" in str(err.value) and "A_max=1.0" in str(err.value) and "-0.5" in str(err.value)
    # the boundary is rejected: curvature 0 at A = −A_max
    with pytest.raises(ValueError):
        check_convexity(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        check_convexity(1.1, 1e-3, -1.0)
    # the defaults: 1.1 + 0.001 − 1 = 0.101 > 0
    assert check_convexity(1.1, 1e-3, 1.0) is None


def test_bad_scalars():
    with pytest.raises(ValueError, match="gamma and lam"):
        advantage_flow_loss(F, X0, FOLD, FREF, A, gamma=-1.0, lam=0.0)


@pytest.mark.parametrize("lam", [1e-3, 0.0])
def test_fitting_a_free_tensor_lands_on_the_target(lam):
    g = torch.Generator().manual_seed(0)
    shape = (4, 2, 3, 3)
    x0, f_old, f_ref = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    # includes A = −0.9: A + γ + λ = 0.2 + λ > 0, so the minimiser sits beyond f_old
    advantages = torch.tensor([1.0, -0.9, 0.3, -0.5], dtype=torch.float64)
    gamma = 1.1
    f = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    opt = torch.optim.LBFGS([f], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = advantage_flow_loss(f, x0, f_old, f_ref, advantages, gamma=gamma, lam=lam)[0].sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    target = advantage_flow_target(x0, f_old, f_ref, advantages, gamma, lam)
    assert (f.detach() - target).abs().max() < 1e-4
