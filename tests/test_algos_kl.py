"""KL estimators, exact KL, masked mean and KL coefficient controllers against hand-computed values."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastarcher.algos.kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_full,
    kl_penalty,
    masked_mean,
)

t = torch.tensor
f64 = torch.float64
TOKEN_KINDS = ("kl", "abs", "mse", "low_var_kl")

# row 0: d = logp − ref = [1, −1, 0]; row 1: d = [5, −5, 0] (δ = ref − logp = −d)
LOGP = t([[-1.0, -2.0, -0.5], [-0.1, -5.0, -3.0]], dtype=f64)
REF = t([[-2.0, -1.0, -0.5], [-5.1, 0.0, -3.0]], dtype=f64)
E = math.e


@pytest.mark.parametrize("kind, expected", [
    # k1 = d
    ("kl", [[1.0, -1.0, 0.0], [5.0, -5.0, 0.0]]),
    # |d|
    ("abs", [[1.0, 1.0, 0.0], [5.0, 5.0, 0.0]]),
    # ½ d²: ½·1 = 0.5 ; ½·25 = 12.5
    ("mse", [[0.5, 0.5, 0.0], [12.5, 12.5, 0.0]]),
    # k3 = e^δ − δ − 1 with δ = −d:
    #   δ = −1: e^−1 + 1 − 1 = e^−1 = 0.36788 ; δ = 1: e − 2 = 0.71828
    #   δ = −5: e^−5 + 5 − 1 = 4.00674        ; δ = 5: e^5 − 6 = 142.41 → clamped to 10 (verl)
    ("low_var_kl", [[1 / E, E - 2, 0.0], [math.exp(-5) + 4, 10.0, 0.0]]),
])
def test_kl_penalty_hand_values(kind, expected):
    out = kl_penalty(LOGP, REF, kind)
    assert out.shape == LOGP.shape and out.dtype == f64
    torch.testing.assert_close(out, t(expected, dtype=f64))


def test_kl_penalty_is_zero_when_policies_agree():
    logp = torch.randn(3, 7, dtype=f64)
    for kind in TOKEN_KINDS:
        assert kl_penalty(logp, logp.clone(), kind).abs().max() == 0, kind
    rows = torch.randn(2, 3, 11).log_softmax(-1)
    assert kl_full(rows, rows.clone()).abs().max() == 0


def test_low_var_kl_is_never_negative_even_for_tiny_differences():
    # tiny |δ| is where exp(δ) − δ − 1 loses to rounding (1 + 5e-8 rounds to 1 in float32, leaving −6e-8)
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4096, generator=gen) * 30
    deltas = torch.cat([torch.randn(2048, generator=gen) * 15,  # beyond both clamps too
                        torch.randn(1024, generator=gen) * 1e-6,
                        t([5e-8, -5e-8, 1e-7, -1e-7, 3e-8, 1e-30, -1e-30, 0.0]).repeat(128)])
    k3 = kl_penalty(logp, logp + deltas, "low_var_kl")
    assert (k3 >= 0).all(), k3.min()
    assert k3.max() == 10.0  # the output clamp is reached by the wide draws


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_kl_penalty_gradcheck(kind):
    gen = torch.Generator().manual_seed(1)
    ref = -torch.rand(3, 5, generator=gen, dtype=f64) * 4
    # |d| in [0.1, 1.5]: away from 0 (abs has a kink there) and inside k3's clamps (no zero-gradient zone)
    d = (torch.rand(3, 5, generator=gen, dtype=f64) * 1.4 + 0.1) * torch.where(
        torch.rand(3, 5, generator=gen) < 0.5, -1.0, 1.0).to(f64)
    logp = (ref + d).requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: kl_penalty(lp, ref, kind), (logp,))


def test_kl_full_gradcheck_both_arguments():
    gen = torch.Generator().manual_seed(2)
    logp = torch.randn(2, 3, 6, generator=gen, dtype=f64).log_softmax(-1).requires_grad_()
    ref = torch.randn(2, 3, 6, generator=gen, dtype=f64).log_softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(kl_full, (logp, ref))


def test_kl_full_matches_kl_div_and_a_direct_sum():
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(2, 4, 9, generator=gen, dtype=f64).log_softmax(-1)
    ref = torch.randn(2, 4, 9, generator=gen, dtype=f64).log_softmax(-1)
    out = kl_full(logp, ref)
    assert out.shape == (2, 4)
    # F.kl_div(input=log q, target=log p, log_target=True) = p (log p − log q), elementwise
    torch.testing.assert_close(out, F.kl_div(ref, logp, reduction="none", log_target=True).sum(-1))
    torch.testing.assert_close(out, (logp.exp() * (logp - ref)).sum(-1))
    assert (out > 0).all()
    # hand: p = [½, ½, 0], q = [¼, ¼, ½] → ½ ln 2 + ½ ln 2 + 0 = ln 2
    p, q = t([[[0.5, 0.5, 0.0]]], dtype=f64), t([[[0.25, 0.25, 0.5]]], dtype=f64)
    torch.testing.assert_close(kl_full(p.log(), q.log()), t([[math.log(2)]], dtype=f64))


def test_kl_full_masked_vocabulary_entries():
    # π masks token 2 (log p = −inf): it contributes 0, and its gradient is 0, not nan
    logp = t([[[math.log(0.5), math.log(0.5), -math.inf]]], dtype=f64, requires_grad=True)
    ref = t([[[math.log(0.25), math.log(0.25), -math.inf]]], dtype=f64)  # both mask it: −inf − (−inf)
    out = kl_full(logp, ref)
    torch.testing.assert_close(out, t([[math.log(2)]], dtype=f64))
    out.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 0, 2] == 0
    # the reference masks a token π gives mass to: KL is +inf, its true value (not nan)
    assert kl_full(t([[0.5, 0.5]]).log(), t([[1.0, 0.0]]).log()).item() == math.inf


def test_kl_penalty_refuses_full_unknown_kinds_and_mismatched_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl_full"):
        kl_penalty(x, x, "full")
    with pytest.raises(ValueError, match="low_var_kl") as info:
        kl_penalty(x, x, "k3")
    assert all(kind in str(info.value) for kind in KL_KINDS)
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(x, torch.zeros(2, 4), "kl")
    with pytest.raises(ValueError, match="shape"):
        kl_full(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


def test_k1_and_k3_sample_means_estimate_kl_and_k2_is_biased():
    # p = [.5, .3, .2], q = [.2, .3, .5]: KL(p‖q) = .5 ln 2.5 + .3 ln 1 + .2 ln .4 = .3 ln 2.5 = 0.274887
    p, q = t([0.5, 0.3, 0.2], dtype=f64), t([0.2, 0.3, 0.5], dtype=f64)
    kl_true = 0.3 * math.log(2.5)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(4))
    logp, ref = p.log()[tokens], q.log()[tokens]
    k1, k2, k3 = (kl_penalty(logp, ref, kind) for kind in ("kl", "mse", "low_var_kl"))
    # std(k1) = 0.716, std(k3) = 0.206 → standard errors 0.0016 and 0.0005 at n = 200k; tolerance 0.01 ≥ 6 SE
    assert abs(k1.mean().item() - kl_true) < 0.01
    assert abs(k3.mean().item() - kl_true) < 0.01
    # E[k2] = ½ (.5 + .2)(ln 2.5)² = 0.29386: biased by 0.019, so the tolerance above can tell
    assert abs(k2.mean().item() - kl_true) > 0.01
    assert k3.var() < k1.var() / 5  # Schulman's point: the control variate cuts the variance


def test_expected_loss_gradients_match_the_docstring():
    """Exact on-policy expectation E_{a~p}[∇_θ k(a)] = Σ_a p_a ∇_θ k(a), p = softmax(θ), q fixed:
    k1 → 0, k2 → ∇ KL(p‖q), k3 → ∇ KL(q‖p)."""
    theta = t([0.3, -0.2, 0.8, -1.0], dtype=f64, requires_grad=True)
    ref = t([-0.5, 0.4, -0.3, 0.2], dtype=f64).log_softmax(-1)

    def expected_grad(kind):
        logp = theta.log_softmax(-1)
        loss = (logp.exp().detach() * kl_penalty(logp, ref, kind)).sum()  # weights = sampling probs, fixed
        return torch.autograd.grad(loss, theta)[0]

    def grad_of(fn):
        return torch.autograd.grad(fn(theta.log_softmax(-1)), theta)[0]

    reverse = grad_of(lambda logp: kl_full(logp, ref))  # ∇ KL(π‖π_ref)
    forward = grad_of(lambda logp: kl_full(ref, logp))  # ∇ KL(π_ref‖π)
    torch.testing.assert_close(expected_grad("kl"), torch.zeros(4, dtype=f64))
    torch.testing.assert_close(expected_grad("mse"), reverse)
    torch.testing.assert_close(expected_grad("low_var_kl"), forward)
    assert (forward - reverse).abs().max() > 0.05  # the two directions really differ here


def test_masked_mean():
    x = t([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]], requires_grad=True)
    mask = t([[True, True, False], [True, False, True]])
    # all: (1 + 2 + 4 + 6) / 4 = 3.25 ; per row: (1 + 2)/2 = 1.5, (4 + 6)/2 = 5
    out = masked_mean(x, mask)
    torch.testing.assert_close(out, t(3.25))
    torch.testing.assert_close(masked_mean(x, mask.float(), dim=1), t([1.5, 5.0]))
    out.backward()
    torch.testing.assert_close(x.grad, t([[0.25, 0.25, 0.0], [0.25, 0.0, 0.25]]))  # nan/inf leak nowhere
    torch.testing.assert_close(masked_mean(x.detach(), torch.zeros(2, 3, dtype=torch.bool)), t(0.0))
    # a (B, 1) mask broadcasts over T
    torch.testing.assert_close(masked_mean(t([[1.0, 3.0], [5.0, 7.0]]), t([[True], [False]])), t(2.0))


def test_adaptive_controller_hand_computed():
    ctl = AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100)
    ctl.update(1.1, 10)   # e = 0.1            → ×(1 + 0.1·10/100) = ×1.01 → 0.101
    assert ctl.value == pytest.approx(0.101, rel=1e-12)
    ctl.update(3.0, 10)   # e = 2.0 → clip 0.2 → ×1.02 → 0.10302
    assert ctl.value == pytest.approx(0.10302, rel=1e-12)
    ctl.update(0.0, 50)   # e = −1 → clip −0.2 → ×(1 − 0.2·0.5) = ×0.9 → 0.092718
    assert ctl.value == pytest.approx(0.092718, rel=1e-12)
    ctl.update(0.95, 20)  # e = −0.05          → ×(1 − 0.05·0.2) = ×0.99 → 0.09179082
    assert ctl.value == pytest.approx(0.09179082, rel=1e-12)
    ctl.update(5.0, 0)    # no steps, no change
    assert ctl.value == pytest.approx(0.09179082, rel=1e-12)


def test_adaptive_controller_clips_the_error_at_plus_minus_0_2():
    for kl, factor in [(1e6, 1.2), (2.0, 1.2), (1.2, 1.2), (-3.0, 0.8), (0.8, 0.8), (1.1, 1.1)]:
        ctl = AdaptiveKLController(1.0, target=1.0, horizon=10)
        ctl.update(kl, 10)  # n_steps = horizon: multiplier = 1 + clip(kl − 1, ±0.2)
        assert ctl.value == pytest.approx(factor, rel=1e-12), kl


def test_adaptive_controller_refuses_bad_inputs():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=-1)
    with pytest.raises(ValueError, match="init_coef"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    for kl, n in [(float("nan"), 1), (True, 1), (torch.tensor(1.0), 1), (1.0, -1), (1.0, 2.5), (1.0, 51)]:
        with pytest.raises(ValueError):
            ctl.update(kl, n)
    assert ctl.value == 0.1


def test_controller_state_round_trip_and_contract():
    ctl = AdaptiveKLController(0.2, target=0.5, horizon=1000)
    for kl in (0.7, 0.1, 0.55):
        ctl.update(kl, 64)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain JSON
    assert state == {"value": ctl.value}
    restored = AdaptiveKLController(0.2, target=0.5, horizon=1000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value != 0.2
    for kl in (0.9, 0.3):  # continues identically
        ctl.update(kl, 64)
        restored.update(kl, 64)
        assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05 and fixed.state_dict() == {}
    fixed.load_state_dict({})
    assert ctl.checkpoint_scope == fixed.checkpoint_scope == "run"  # the contract of checkpoint/parts.py


@pytest.mark.parametrize("state", [
    {"value": "0.1"}, {"value": True}, {"value": None}, {"value": float("nan")}, {"value": -1.0},
    {}, {"value": 0.1, "target": 1.0}, [0.1],
])
def test_adaptive_load_state_dict_rejects_bad_states(state):
    ctl = AdaptiveKLController(0.3, target=1.0, horizon=10)
    with pytest.raises(ValueError):
        ctl.load_state_dict(state)
    assert ctl.value == 0.3


def test_fixed_load_state_dict_refuses_an_adaptive_state():
    with pytest.raises(ValueError, match="keys"):
        FixedKLController(0.1).load_state_dict({"value": 0.2})
    with pytest.raises(ValueError):
        FixedKLController(float("inf"))
