"""PPO policy loss, value loss and loss aggregation against hand-computed values, gradients and gradcheck."""
import math

import pytest
import torch

from fastarcher.algos.ppo_loss import AGG_MODES, aggregate, ppo_policy_loss, value_loss

t = torch.tensor
f64 = torch.float64
NAN = float("nan")


def _policy(ratios, advantages, mask=None, **kw):
    """logprob = log r (requires grad), old_logprob = 0, so exp(logprob − old) = r. Returns (loss, metrics, grad)."""
    logp = t(ratios, dtype=f64).log().requires_grad_(True)
    adv = t(advantages, dtype=f64)
    mask = torch.ones_like(adv) if mask is None else t(mask, dtype=f64)
    loss, metrics = ppo_policy_loss(logp, torch.zeros_like(adv), adv, mask, **kw)
    loss.backward()
    return loss, metrics, logp.grad


# ------------------------------------------------------------------------------------------------
# aggregate
# ------------------------------------------------------------------------------------------------

L23 = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=f64)
M23 = t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=f64)  # row 1 has no scored token


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 1.5),               # (1 + 2) / 2
    ("seq-mean-token-sum", 3.0),       # one non-empty row: (1 + 2) / 1 ; the empty row is excluded
    ("seq-mean-token-mean", 1.5),      # row 0 token mean (1 + 2)/2 = 1.5, averaged over 1 row
    ("seq-mean-token-sum-norm", 0.5),  # (1 + 2) / (B·T = 2·3)
])
def test_aggregate_2x3_with_empty_row(mode, expected):
    assert abs(aggregate(L23, M23, mode).item() - expected) < 1e-12


L33 = t([[1.0, 2.0, NAN], [NAN, 5.0, math.inf], [7.0, 8.0, 9.0]], dtype=f64)  # nan/inf only where mask = 0
M33 = t([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("mode, norm, expected, grad", [
    # Σ m·l = 1 + 2 + 7 + 8 + 9 = 27 over Σ m = 5 tokens → 5.4 ; ∂/∂l = m / 5
    ("token-mean", None, 5.4, [[0.2, 0.2, 0], [0, 0, 0], [0.2, 0.2, 0.2]]),
    # row sums 3, —, 24 over 2 non-empty rows → 13.5 ; ∂/∂l = m / 2
    ("seq-mean-token-sum", None, 13.5, [[0.5, 0.5, 0], [0, 0, 0], [0.5, 0.5, 0.5]]),
    # row means 1.5, —, 8 → 4.75 ; ∂/∂l = m / (2 · row count): 1/4 on row 0, 1/6 on row 2
    ("seq-mean-token-mean", None, 4.75, [[0.25, 0.25, 0], [0, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),
    # 27 / (B·T = 9) = 3 ; ∂/∂l = m / 9
    ("seq-mean-token-sum-norm", None, 3.0, [[1 / 9, 1 / 9, 0], [0, 0, 0], [1 / 9, 1 / 9, 1 / 9]]),
    # 27 / (B·norm = 3·4.5) = 2 ; ∂/∂l = m / 13.5
    ("seq-mean-token-sum-norm", 4.5, 2.0, [[1 / 13.5, 1 / 13.5, 0], [0, 0, 0], [1 / 13.5] * 3]),
])
def test_aggregate_values_and_gradients_ignore_padding(mode, norm, expected, grad):
    loss_mat = L33.clone().requires_grad_(True)
    out = aggregate(loss_mat, M33, mode, norm)
    out.backward()
    torch.testing.assert_close(out, t(expected, dtype=f64))
    torch.testing.assert_close(loss_mat.grad, t(grad, dtype=f64))  # finite: padding nan/inf never reached


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_empty_mask_is_zero_in_graph(mode):
    loss_mat = torch.randn(2, 3, dtype=f64, requires_grad=True)
    out = aggregate(loss_mat, torch.zeros(2, 3), mode)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(loss_mat.grad, torch.zeros(2, 3, dtype=f64))


# ------------------------------------------------------------------------------------------------
# ppo_policy_loss: hand-computed clip cases (ε = 0.2 unless stated)
# ------------------------------------------------------------------------------------------------


def test_ratio_inside_clip_range_is_plain_surrogate():
    # r = [1.1, 0.9, 1.0], A = [2, −1, 0.5]: all inside [0.8, 1.2] → l = −A·r = [−2.2, 0.9, −0.5]
    # mean = (−2.2 + 0.9 − 0.5)/3 = −0.6 ; ∂l/∂log r = −A·r / 3 = [−2.2, 0.9, −0.5] / 3
    loss, m, grad = _policy([[1.1, 0.9, 1.0]], [[2.0, -1.0, 0.5]])
    torch.testing.assert_close(loss, t(-0.6, dtype=f64))
    torch.testing.assert_close(grad, t([[-2.2, 0.9, -0.5]], dtype=f64) / 3)
    assert m["actor/clip_fraction"].item() == 0.0
    torch.testing.assert_close(m["actor/pg_loss"], t(-0.6, dtype=f64))
    torch.testing.assert_close(m["actor/ratio_mean"], t(1.0, dtype=f64))  # (1.1 + 0.9 + 1.0)/3
    # k3 = r − 1 − log r: (0.1 − log 1.1) + (−0.1 − log 0.9) + 0
    kl = (0.1 - math.log(1.1) - 0.1 - math.log(0.9)) / 3
    torch.testing.assert_close(m["actor/approx_kl"], t(kl, dtype=f64))
    assert all(not v.requires_grad for v in m.values()) and "actor/dual_clip_fraction" not in m


def test_clip_cases_values_and_gradients():
    # token 0: r = 1.5, A = +1: max(−1.5, −1.2) = −1.2 clipped (constant) → grad 0
    # token 1: r = 0.5, A = −1: max(0.5, 0.8) = 0.8 clipped → grad 0
    # token 2: r = 0.5, A = +1: max(−0.5, −0.8) = −0.5 unclipped (pessimistic) → grad −A·r/4 = −0.125
    # token 3: r = 1.5, A = −1: max(1.5, 1.2) = 1.5 unclipped → grad −A·r/4 = 0.375
    # mean = (−1.2 + 0.8 − 0.5 + 1.5)/4 = 0.15 ; clip fraction 2/4
    loss, m, grad = _policy([[1.5, 0.5, 0.5, 1.5]], [[1.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(loss, t(0.15, dtype=f64))
    torch.testing.assert_close(grad, t([[0.0, 0.0, -0.125, 0.375]], dtype=f64))
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() == 0.0
    torch.testing.assert_close(m["actor/clip_fraction"], t(0.5, dtype=f64))


def test_asymmetric_clip_higher():
    # clip range [1 − 0.2, 1 + 0.28] = [0.8, 1.28]
    # r = 1.25, A = +1: inside → −1.25, grad −1.25/3       (symmetric ε = 0.2 would clip it to −1.2)
    # r = 1.40, A = +1: above → −1.28 constant, grad 0
    # r = 0.75, A = −1: below the low edge → max(0.75, 0.8) = 0.8 constant, grad 0
    # mean = (−1.25 − 1.28 + 0.8)/3 = −1.73/3
    loss, m, grad = _policy([[1.25, 1.4, 0.75]], [[1.0, 1.0, -1.0]], clip_high=0.28)
    torch.testing.assert_close(loss, t(-1.73 / 3, dtype=f64))
    torch.testing.assert_close(grad, t([[-1.25 / 3, 0.0, 0.0]], dtype=f64))
    torch.testing.assert_close(m["actor/clip_fraction"], t(2 / 3, dtype=f64))
    sym, _, _ = _policy([[1.25, 1.4, 0.75]], [[1.0, 1.0, -1.0]])
    torch.testing.assert_close(sym, t((-1.2 - 1.2 + 0.8) / 3, dtype=f64))


def test_dual_clip_caps_negative_advantage_loss():
    # c = 3, r = [4, 2, 4, 5], A = [−1, −1, +1, −2]
    # token 0: max(4, 1.2) = 4 > −A·c = 3 → 3, grad 0
    # token 1: max(2, 1.2) = 2 < 3 → 2, grad −A·r/4 = 0.5
    # token 2: A > 0: max(−4, −1.2) = −1.2 (clipped, untouched by the dual clip), grad 0
    # token 3: max(10, 2.4) = 10 > 6 → 6, grad 0
    # mean = (3 + 2 − 1.2 + 6)/4 = 2.45 ; dual clip fraction 2/4 ; clip fraction 1/4 (token 2)
    loss, m, grad = _policy([[4.0, 2.0, 4.0, 5.0]], [[-1.0, -1.0, 1.0, -2.0]], dual_clip=3.0)
    torch.testing.assert_close(loss, t(2.45, dtype=f64))
    torch.testing.assert_close(grad, t([[0.0, 0.5, 0.0, 0.0]], dtype=f64))
    torch.testing.assert_close(m["actor/dual_clip_fraction"], t(0.5, dtype=f64))
    torch.testing.assert_close(m["actor/clip_fraction"], t(0.25, dtype=f64))
    # without the dual clip: (4 + 2 − 1.2 + 10)/4 = 3.7
    plain, _, _ = _policy([[4.0, 2.0, 4.0, 5.0]], [[-1.0, -1.0, 1.0, -2.0]])
    torch.testing.assert_close(plain, t(3.7, dtype=f64))


@pytest.mark.parametrize("kw", [{}, {"clip_high": 0.28}, {"dual_clip": 3.0}, {"clip_low": 0.1, "dual_clip": 1.5}])
def test_on_policy_gradient_is_reinforce_exactly(kw):
    # at logprob == old_logprob, r = 1 in every branch: ∂loss/∂logprob = −A·m / Σm (Σm = 4, a power of 2,
    # so 1/Σm is exact and the comparison can be bitwise)
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 4, generator=gen, dtype=f64)
    adv = torch.randn(2, 4, generator=gen, dtype=f64)
    mask = t([[1, 1, 0, 1], [0, 1, 0, 0]], dtype=f64)
    x = logp.clone().requires_grad_(True)
    loss, m = ppo_policy_loss(x, logp.clone(), adv, mask, **kw)
    loss.backward()
    assert torch.equal(x.grad, -adv * mask / 4)
    torch.testing.assert_close(loss, (-adv * mask).sum() / 4)
    assert m["actor/clip_fraction"].item() == 0.0 and m["actor/approx_kl"].item() == 0.0


def test_padding_nan_and_extreme_log_ratio_stay_finite():
    # masked-out tokens hold nan log-probs/advantages; token 1 has log r = 30, clamped to 20 (grad 0 there)
    logp = t([[0.0, 30.0, NAN]], dtype=f64, requires_grad=True)
    adv = t([[1.0, -1.0, NAN]], dtype=f64)
    loss, m = ppo_policy_loss(logp, torch.zeros(1, 3, dtype=f64), adv, t([[1.0, 1.0, 0.0]]))
    loss.backward()
    # token 0: −1 ; token 1: A < 0, max(e^20, 1.2) = e^20 → mean (e^20 − 1)/2
    torch.testing.assert_close(loss, t((math.exp(20) - 1) / 2, dtype=f64))
    torch.testing.assert_close(logp.grad, t([[-0.5, 0.0, 0.0]], dtype=f64))
    assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kw", [{}, {"clip_high": 0.3, "dual_clip": 2.0}])
def test_policy_loss_gradcheck(agg, kw):
    # log r in ±0.1 (inside the clip range) plus tokens far beyond it (r = 1.6, 0.4; r = 3 with A < 0
    # beyond the dual clip at 2): no kink within the finite-difference step
    lr = t([[0.05, -0.08, math.log(1.6), 0.02], [math.log(0.4), 0.09, -0.03, math.log(3.0)]], dtype=f64)
    adv = t([[0.7, -1.3, 0.9, -0.4], [-1.1, 0.5, 2.0, -0.8]], dtype=f64)
    old = t([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.5, -0.7, -2.2]], dtype=f64)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=f64)
    x = (old + lr).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ppo_policy_loss(z, old, adv, mask, agg=agg, **kw)[0], (x,))


# ------------------------------------------------------------------------------------------------
# value_loss
# ------------------------------------------------------------------------------------------------

V = t([[1.0, 2.0, 3.0]], dtype=f64)
OLD_V = t([[1.2, 1.0, 2.0]], dtype=f64)
R = t([[1.5, 0.0, 3.0]], dtype=f64)


def test_value_loss_unclipped():
    # (V − R)² = [0.25, 4, 0] → ½ · 4.25/3 ; ∂/∂V = (V − R)/3 = [−0.5, 2, 0]/3
    v = V.clone().requires_grad_(True)
    loss, m = value_loss(v, OLD_V, R, torch.ones(1, 3))
    loss.backward()
    torch.testing.assert_close(loss, t(0.5 * 4.25 / 3, dtype=f64))
    torch.testing.assert_close(v.grad, t([[-0.5, 2.0, 0.0]], dtype=f64) / 3)
    torch.testing.assert_close(m["critic/value_loss"], loss.detach())
    assert "critic/value_clip_fraction" not in m


def test_value_loss_clipped():
    # ε = 0.5: V − V_old = [−0.2, 1, 1] → clamp [−0.2, 0.5, 0.5] → V_clip = [1.0, 1.5, 2.5]
    # (V_clip − R)² = [0.25, 2.25, 0.25] vs (V − R)² = [0.25, 4, 0] → max [0.25, 4, 0.25]
    # loss = ½ · 4.5/3 = 0.75 ; clipped term strictly larger on token 2 only → fraction 1/3
    # grads: token 0 (tie, both branches give V − R = −0.5) −0.5/3 ; token 1 unclipped 2/3 ;
    #        token 2 through the clamped V_clip → 0
    v = V.clone().requires_grad_(True)
    loss, m = value_loss(v, OLD_V, R, torch.ones(1, 3), clip=0.5)
    loss.backward()
    torch.testing.assert_close(loss, t(0.75, dtype=f64))
    torch.testing.assert_close(v.grad, t([[-0.5 / 3, 2 / 3, 0.0]], dtype=f64))
    torch.testing.assert_close(m["critic/value_clip_fraction"], t(1 / 3, dtype=f64))


def test_explained_variance_hand_case():
    # R = [1.5, 0, 3]: mean 1.5, Var = (0 + 2.25 + 2.25)/3 = 1.5
    # R − V = [0.5, −2, 0]: mean −0.5, deviations [1, −1.5, 0.5] → Var = 3.5/3
    # EV = 1 − (3.5/3)/1.5 = 1 − 7/9 = 2/9 ; a 4th masked-out token holds nan and is ignored
    v = t([[1.0, 2.0, 3.0, NAN]], dtype=f64)
    r = t([[1.5, 0.0, 3.0, NAN]], dtype=f64)
    _, m = value_loss(v, v, r, t([[1, 1, 1, 0]]))
    torch.testing.assert_close(m["critic/explained_variance"], t(2 / 9, dtype=f64))
    _, m = value_loss(r[:, :3], r[:, :3], r[:, :3], torch.ones(1, 3))  # V = R → 1
    torch.testing.assert_close(m["critic/explained_variance"], t(1.0, dtype=f64))
    _, m = value_loss(v[:, :3], v[:, :3], torch.full((1, 3), 2.0, dtype=f64), torch.ones(1, 3))  # Var(R) = 0 → 0
    assert m["critic/explained_variance"].item() == 0.0
    loss, m = value_loss(v.requires_grad_(True), v, r, torch.zeros(1, 4))  # empty mask: 0 loss, EV 0
    loss.backward()
    assert loss.item() == 0.0 and m["critic/explained_variance"].item() == 0.0
    assert all(not x.requires_grad for x in m.values())


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss_gradcheck(clip, agg):
    # V − V_old in {±0.2 (inside), 1.0, −0.9 (outside)}; no ties between the two squared errors
    old = t([[0.3, -1.0, 2.0], [0.5, 1.5, -0.4]], dtype=f64)
    x = (old + t([[0.2, 1.0, -0.2], [-0.9, 0.1, 0.15]], dtype=f64)).requires_grad_(True)
    r = t([[1.0, 0.2, 1.1], [0.9, -0.5, 0.3]], dtype=f64)
    mask = t([[1, 1, 1], [1, 0, 1]], dtype=f64)
    assert torch.autograd.gradcheck(lambda z: value_loss(z, old, r, mask, clip=clip, agg=agg)[0], (x,))


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------

Z = torch.zeros(2, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: aggregate(Z, Z, "mean"), "mode"),
    (lambda: aggregate(Z, torch.zeros(2, 4), "token-mean"), "mask shape"),
    (lambda: aggregate(torch.zeros(6), torch.zeros(6), "token-mean"), r"loss_mat must be \(B, T\)"),
    (lambda: aggregate(Z, Z, "seq-mean-token-sum-norm", 0.0), "norm"),
    (lambda: aggregate(Z, Z, "token-mean", 3.0), "norm"),
    (lambda: ppo_policy_loss(Z, torch.zeros(3, 2), Z, Z), "old_logprob shape"),
    (lambda: ppo_policy_loss(Z, Z, torch.zeros(2, 3, 1), Z), "advantages shape"),
    (lambda: ppo_policy_loss(Z, Z, Z, torch.zeros(3)), "mask shape"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, clip_low=0.0), "clip_low"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, clip_low=1.0), "clip_low"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, clip_low=True), "clip_low"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, clip_high=0.0), "clip_high"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, clip_high=math.nan), "clip_high"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, dual_clip=1.0), "dual_clip"),
    (lambda: ppo_policy_loss(Z, Z, Z, Z, agg="sum"), "agg"),
    (lambda: value_loss(Z, Z, torch.zeros(2, 2), Z), "returns shape"),
    (lambda: value_loss(Z, Z, Z, Z, clip=0.0), "clip"),
    (lambda: value_loss(Z, Z, Z, Z, clip=-0.2), "clip"),
    (lambda: value_loss(Z, Z, Z, Z, agg="token-sum"), "agg"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
