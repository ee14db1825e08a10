"""DiffusionNFT loss on hand-computed numbers, and its relation to AdvantageFlow."""

import pytest
import torch

from learner.objectives.advantage_flow import advantage_flow_loss
from learner.objectives.diffusion_nft import diffusion_nft_loss, nft_optimality

# Three samples of two elements each, shaped (3, 1, 1, 2), one per case r = 1, 0, 0.5.
V = torch.tensor([[2.0, 0.0], [2.0, 0.0], [4.0, 0.0]]).view(3, 1, 1, 2)
VOLD = torch.tensor([[0.0, 0.0], [2.0, 2.0], [0.0, 2.0]]).view(3, 1, 1, 2)
U = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]).view(3, 1, 1, 2)
R = torch.tensor([1.0, 0.0, 0.5])


def test_loss_hand_computed_r1_r0_rhalf():
    # β = 0.5: v⁺ = 0.5·v_old + 0.5·v_θ,  v⁻ = 1.5·v_old − 0.5·v_θ
    # r = 1:   v⁺ = (1, 0), v⁺ − u = (0, −1) → pos = 0.5;  v⁻ = (−1, 0), v⁻ − u = (−2, −1) → neg = 2.5
    #          ℓ_0 = 1·0.5 + 0·2.5 = 0.5
    # r = 0:   v⁺ = (2, 1), v⁺ − u = (1, 0) → pos = 0.5;   v⁻ = (3, 3) − (1, 0) = (2, 3),
    #          v⁻ − u = (1, 2) → neg = 2.5;  ℓ_1 = 0·0.5 + 1·2.5 = 2.5
    # r = 0.5: v⁺ = (2, 1) → pos = (4 + 1)/2 = 2.5;  v⁻ = (0, 3) − (2, 0) = (−2, 3) → neg = (4 + 9)/2 = 6.5
    #          ℓ_2 = 0.5·2.5 + 0.5·6.5 = 4.5
    losses, stats = diffusion_nft_loss(V, VOLD, U, R, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.5, 2.5, 4.5]))
    assert float(stats["pos"]) == pytest.approx(3.5 / 3)  # (0.5 + 0.5 + 2.5)/3
    assert float(stats["neg"]) == pytest.approx(11.5 / 3)  # (2.5 + 2.5 + 6.5)/3
    assert float(stats["fm"]) == pytest.approx(10 / 3)  # ‖v_θ − u‖² = 1, 1, (16 + 0)/2 = 8
    assert float(stats["old_gap"]) == pytest.approx(14 / 3)  # ‖v_θ − v_old‖² = 2, 2, (16 + 4)/2 = 10
    assert float(stats["r_mean"]) == pytest.approx(0.5)
    assert "ref_reg" not in stats


def test_reference_term_hand_computed():
    # ‖v_θ − v_ref‖²: ((2−2)² + (0−2)²)/2 = 2,  0,  0;  w_ref = 0.1 → ℓ = (0.5 + 0.2, 2.5, 4.5)
    vref = torch.tensor([[2.0, 2.0], [2.0, 0.0], [4.0, 0.0]]).view(3, 1, 1, 2)
    losses, stats = diffusion_nft_loss(V, VOLD, U, R, beta=0.5, v_ref=vref, ref_weight=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.7, 2.5, 4.5]))
    assert float(stats["ref_reg"]) == pytest.approx(2 / 3)
    # given but weighted 0: reported, not added
    losses0, stats0 = diffusion_nft_loss(V, VOLD, U, R, beta=0.5, v_ref=vref)
    torch.testing.assert_close(losses0, torch.tensor([0.5, 2.5, 4.5]))
    assert float(stats0["ref_reg"]) == pytest.approx(2 / 3)


def test_beta1_r1_is_plain_flow_matching():
    g = torch.Generator().manual_seed(0)
    v, v_old, u = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    losses, _ = diffusion_nft_loss(v, v_old, u, torch.ones(4), beta=1.0)
    torch.testing.assert_close(losses, (v - u).pow(2).flatten(1).mean(1))


def test_gradient_hand_computed_rhalf_beta1():
    # β = 1, r = 0.5: ℓ = 0.5·‖v_θ − u‖² + 0.5·‖2·v_old − v_θ − u‖²
    # ∂ℓ/∂v_θ = (1/N)·[(v_θ − u) − (2·v_old − v_θ − u)] = (2/N)·(v_θ − v_old) = v_θ − v_old for N = 2,
    # whatever u is: at A = 0 only the pull towards the rollout policy remains
    # → (2, 0) − (0, 0) = (2, 0);  (2, 0) − (2, 2) = (0, −2);  (4, 0) − (0, 2) = (4, −2)
    # value of the third: 0.5·(16 + 0)/2 + 0.5·‖(−4, 4)‖² = 4 + 0.5·16 = 12
    v = V.clone().requires_grad_(True)
    vold = VOLD.clone().requires_grad_(True)
    losses, _ = diffusion_nft_loss(v, vold, U, torch.full((3,), 0.5), beta=1.0)
    assert float(losses[2].detach()) == pytest.approx(12.0)
    losses.sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[2.0, 0.0], [0.0, -2.0], [4.0, -2.0]]).view(3, 1, 1, 2))
    assert vold.grad is None  # v_old is a constant


def test_optimality_hand_computed_and_clipped():
    # A_max = 1: A/2 + 0.5 = (−0.5, 0, 0.5, 0.75, 1, 2) → clip to [0, 1]
    a = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    torch.testing.assert_close(nft_optimality(a, 1.0), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    # A_max = 5 (the released default): 2.5/5/2 + 0.5 = 0.75;  −10/5/2 + 0.5 = −0.5 → 0
    torch.testing.assert_close(nft_optimality(torch.tensor([2.5, -10.0]), 5.0), torch.tensor([0.75, 0.0]))
    with pytest.raises(ValueError, match="a_max"):
        nft_optimality(a, 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs v_ref"):
        diffusion_nft_loss(V, VOLD, U, R, ref_weight=0.1)
    with pytest.raises(ValueError, match="beta"):
        diffusion_nft_loss(V, VOLD, U, R, beta=0.0)
    with pytest.raises(ValueError, match="ref_weight"):
        diffusion_nft_loss(V, VOLD, U, R, v_ref=V, ref_weight=-1.0)


@pytest.mark.parametrize("beta", [1.0, 1.5])
@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 1.0])
def test_is_advantage_flow_with_gamma_beta_minus_a(beta, r):
    # ℓ_NFT = β·AdvantageFlow(Â, γ = β − Â, λ = 0) + (1 − β·Â)·‖v_old − u‖²,  Â = 2r − 1;
    # β ≥ 1 keeps γ ≥ 0, which advantage_flow_loss requires.
    g = torch.Generator().manual_seed(1)
    v, v_old, u = (torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a_hat = 2 * r - 1
    v1 = v.clone().requires_grad_(True)
    nft, _ = diffusion_nft_loss(v1, v_old, u, torch.full((3,), r, dtype=torch.float64), beta=beta)
    v2 = v.clone().requires_grad_(True)
    af, _ = advantage_flow_loss(v2, u, v_old, v_old, torch.full((3,), a_hat, dtype=torch.float64),
                                gamma=beta - a_hat, lam=0.0)
    const = (1 - beta * a_hat) * (v_old - u).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(nft, beta * af + const)
    nft.sum().backward()
    (beta * af).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)


@pytest.mark.parametrize(("loss", "times", "key"), [("velocity", "uniform", "fm"), ("released", "grid", "pos_weight")])
def test_rule_runs_either_loss(loss, times, key):
    # the rule picks the loss by diffusion_nft.loss; the velocity variant keeps its statistics
    import dataclasses

    from learner.learner import Learner, LearnerSettings
    from learner.settings import DiffusionNFTParams
    from tests.helpers import fake_batch, table_encode, tiny_velocity

    s = dataclasses.replace(LearnerSettings(), objective="diffusion_nft", rollout_update="ema",
                            diffusion_nft=DiffusionNFTParams(loss=loss, times=times, ref_weight=0.0))
    stats = Learner(tiny_velocity(), table_encode, s).update(fake_batch(), torch.linspace(0, 1, 8))
    assert key in stats and stats["loss"] > 0
