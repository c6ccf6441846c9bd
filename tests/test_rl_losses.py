"""PPO and GRPO losses (zerojax.rlhf.losses) against hand-written float64 loops over rows and
tokens, plus their exact cases: ratio 1 and KL 0 at equal log-probs, reward-to-go returns,
micro-batch invariance of the token weights, zero gradients where a token is masked or clipped."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerojax.rlhf import losses

B, T = 4, 6


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    logps = (rng.standard_normal((B, T)) * 0.5 - 1.0).astype(np.float32)
    old = (logps + rng.standard_normal((B, T)) * 0.3).astype(np.float32)   # ratios both sides of the clip
    ref = (logps + rng.standard_normal((B, T)) * 0.3).astype(np.float32)
    adv = rng.standard_normal((B, T)).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    mask[0, :4], mask[1, 1:6], mask[2, :], mask[3, 2:3] = 1, 1, 1, 1      # padded tail, late start, full, one token
    return logps, old, ref, adv, mask


def _counted(weights):
    return [(b, t) for b in range(weights.shape[0]) for t in range(weights.shape[1]) if weights[b, t] > 0]


def _hand_kl(lp, rf, estimator):
    d = float(lp) - float(rf)
    return {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) + d - 1.0}[estimator]


def _hand_policy(logps, old, adv, weights, lo, hi):
    """(loss, metrics) of PPO's clipped surrogate, one token at a time."""
    loss, n, low, high, kl, ratios = 0.0, 0, 0, 0, 0.0, []
    for b in range(weights.shape[0]):
        for t in range(weights.shape[1]):
            if weights[b, t] <= 0:
                continue
            r, a = math.exp(float(logps[b, t]) - float(old[b, t])), float(adv[b, t])
            loss += -min(r * a, min(max(r, 1 - lo), 1 + hi) * a) * float(weights[b, t])
            n += 1
            low += r < 1 - lo and a < 0
            high += r > 1 + hi and a > 0
            kl += 0.5 * (float(logps[b, t]) - float(old[b, t])) ** 2
            ratios.append(r)
    return loss / weights.shape[0], {
        "clip_fraction": (low + high) / n, "clip_ratio/low_mean": low / n, "clip_ratio/high_mean": high / n,
        "approx_kl": kl / n, "ratio_mean": sum(ratios) / n, "ratio_min": min(ratios), "ratio_max": max(ratios)}


def _hand_gae(rewards, values, mask, gamma, lam):
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        next_adv = 0.0
        for t in reversed(range(rewards.shape[1])):
            nxt = t + 1 < rewards.shape[1] and mask[b, t + 1] > 0
            next_value = float(values[b, t + 1]) if nxt else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            a = delta + gamma * lam * (next_adv if nxt else 0.0)
            next_adv = a
            if mask[b, t] > 0:
                adv[b, t], ret[b, t] = a, a + float(values[b, t])
    return adv, ret


def _hand_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _hand_weights(mask, loss_type, max_len=None, total=None):
    w = np.zeros(mask.shape)
    total = sum(float(m) for m in mask.flat) if total is None else total
    for b in range(mask.shape[0]):
        row = sum(float(m) for m in mask[b])
        for t in range(mask.shape[1]):
            w[b, t] = float(mask[b, t]) * {"grpo": 1.0 / max(row, 1.0), "dr_grpo": 1.0 / (max_len or 1),
                                           "dapo": mask.shape[0] / total}[loss_type]
    return w


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- KL and masked stats

@pytest.mark.parametrize("estimator", losses.KL_ESTIMATORS)
def test_kl_per_token_equals_the_hand_formula_and_is_zero_at_the_reference(arrays, estimator):
    logps, _, ref, _, _ = arrays
    want = np.array([[_hand_kl(logps[b, t], ref[b, t], estimator) for t in range(T)] for b in range(B)])
    _close(losses.kl_per_token(logps, ref, estimator), want)
    assert np.all(np.asarray(losses.kl_per_token(logps, logps, estimator)) == 0.0)
    if estimator != "k1":
        assert np.all(np.asarray(losses.kl_per_token(logps, ref, estimator)) >= 0.0)


def test_kl_per_token_rejects_an_unknown_estimator(arrays):
    with pytest.raises(ValueError, match="k1, k2, k3"):
        losses.kl_per_token(arrays[0], arrays[2], "k4")


def test_masked_mean_and_whiten_equal_the_hand_formula(arrays):
    x, _, _, _, mask = arrays
    cells = _counted(mask)
    n = len(cells)
    mean = sum(float(x[c]) for c in cells) / n
    _close(losses.masked_mean(x, mask), mean)
    rows = [sum(float(x[b, t]) for t in range(T) if mask[b, t]) / max(sum(mask[b]), 1) for b in range(B)]
    _close(losses.masked_mean(x, mask, axis=1), rows)
    _close(losses.masked_mean(x, np.zeros_like(mask)), 0.0)
    var = sum((float(x[c]) - mean) ** 2 for c in cells) / (n - 1)
    want = np.zeros((B, T))
    for b, t in cells:
        want[b, t] = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8)
    _close(losses.masked_whiten(x, mask), want)
    _close(losses.masked_whiten(x, mask, shift_mean=False), want + mean * mask)
    whitened = np.asarray(losses.masked_whiten(x, mask), np.float64)
    assert abs(whitened[mask > 0].mean()) < 1e-5 and abs(whitened[mask > 0].std(ddof=1) - 1) < 1e-4


# ---------------------------------------------------------------------------- GAE

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_equals_the_hand_loop(arrays, gamma, lam):
    _, _, _, _, mask = arrays
    rng = np.random.default_rng(3)
    rewards, values = rng.standard_normal((B, T)).astype(np.float32), rng.standard_normal((B, T)).astype(np.float32)
    adv, ret = losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = _hand_gae(rewards, values, mask, gamma, lam)
    _close(adv, want_adv)
    _close(ret, want_ret)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_with_lambda_and_gamma_one_returns_the_reward_to_go(arrays):
    _, _, _, _, mask = arrays
    rng = np.random.default_rng(4)
    rewards, values = rng.standard_normal((B, T)).astype(np.float32), rng.standard_normal((B, T)).astype(np.float32)
    _, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                want[b, t] = sum(float(rewards[b, s]) for s in range(t, T) if mask[b, s])
    _close(ret, want)


def test_gae_on_one_row_worked_by_hand():
    # Prompt at t=0, response t=1..3, padding t=4. gamma=0.5, lam=0.5 (gamma*lam = 0.25).
    rewards = np.array([[9.0, 0.0, 0.0, 1.0, 7.0]], np.float32)
    values = np.array([[5.0, 0.5, 0.25, 0.5, 3.0]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)
    # t=3: delta = 1 + 0.5*0 - 0.5 = 0.5                     A3 = 0.5
    # t=2: delta = 0 + 0.5*0.5 - 0.25 = 0                     A2 = 0 + 0.25*0.5 = 0.125
    # t=1: delta = 0 + 0.5*0.25 - 0.5 = -0.375                A1 = -0.375 + 0.25*0.125 = -0.34375
    adv, ret = losses.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    np.testing.assert_array_equal(np.asarray(adv), [[0.0, -0.34375, 0.125, 0.5, 0.0]])
    np.testing.assert_array_equal(np.asarray(ret), [[0.0, 0.15625, 0.375, 1.0, 0.0]])


# ---------------------------------------------------------------------------- PPO

@pytest.mark.parametrize("lo,hi", [(0.2, None), (0.1, 0.3)])
def test_clipped_policy_loss_equals_the_hand_loop(arrays, lo, hi):
    logps, old, _, adv, mask = arrays
    weights = _hand_weights(mask, "grpo").astype(np.float32)
    loss, metrics = losses.clipped_policy_loss(logps, old, adv, weights, clip_low=lo, clip_high=hi)
    want_loss, want_metrics = _hand_policy(logps, old, adv, weights, lo, lo if hi is None else hi)
    _close(loss, want_loss)
    assert set(metrics) == set(want_metrics)
    for name, want in want_metrics.items():
        _close(metrics[name], want)
    assert 0 < float(metrics["clip_fraction"]) < 1      # the fixture clips some tokens, not all


def test_clipped_policy_loss_at_the_old_policy_has_ratio_one_and_no_clipping(arrays):
    logps, _, _, adv, mask = arrays
    loss, metrics = losses.clipped_policy_loss(logps, logps, adv, mask)
    for name in ("ratio_mean", "ratio_min", "ratio_max"):
        assert float(metrics[name]) == 1.0
    for name in ("clip_fraction", "clip_ratio/low_mean", "clip_ratio/high_mean", "approx_kl"):
        assert float(metrics[name]) == 0.0
    _close(loss, -sum(float(adv[c]) for c in _counted(mask)) / B)


def test_clipped_policy_loss_gradient_is_zero_on_masked_and_clipped_tokens(arrays):
    logps, old, _, adv, mask = arrays
    old = old.copy()
    old[mask == 0] = np.inf                                # padding may hold anything
    weights = _hand_weights(mask, "grpo").astype(np.float32)
    loss_of = lambda lp: losses.clipped_policy_loss(lp, old, adv, weights)[0]
    assert np.isfinite(float(loss_of(jnp.asarray(logps))))
    grad = np.asarray(jax.grad(loss_of)(jnp.asarray(logps)))
    ratio = np.exp(logps.astype(np.float64) - old)
    clipped = (mask > 0) & (((ratio < 0.8) & (adv < 0)) | ((ratio > 1.2) & (adv > 0)))
    free = (mask > 0) & ~clipped
    assert clipped.any() and free.any()
    assert np.all(grad[mask == 0] == 0.0) and np.all(grad[clipped] == 0.0)
    # Unclipped tokens: d/dlogp of -ratio*A*w = -ratio*A*w / B.
    _close(grad[free], (-ratio * adv * weights / B)[free])


def test_value_loss_equals_the_hand_loop(arrays):
    _, _, _, _, mask = arrays
    rng = np.random.default_rng(5)
    values, old_values, returns = (rng.standard_normal((B, T)).astype(np.float32) for _ in range(3))
    weights = _hand_weights(mask, "dapo").astype(np.float32)
    loss, metrics = losses.value_loss(values, old_values, returns, weights, clip=0.2)
    want, clipped, total = 0.0, 0, 0.0
    cells = _counted(weights)
    for b, t in cells:
        v, o, r = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
        vclip = o + min(max(v - o, -0.2), 0.2)
        want += 0.5 * max((v - r) ** 2, (vclip - r) ** 2) * float(weights[b, t])
        clipped += (vclip - r) ** 2 > (v - r) ** 2
        total += v
    _close(loss, want / B)
    _close(metrics["vf_clip_fraction"], clipped / len(cells))
    _close(metrics["value_mean"], total / len(cells))
    assert 0 < float(metrics["vf_clip_fraction"]) < 1


# ---------------------------------------------------------------------------- GRPO

@pytest.mark.parametrize("scale", losses.SCALE_REWARDS)
def test_group_advantages_equal_the_hand_formula(scale):
    rewards = np.random.default_rng(6).standard_normal(12).astype(np.float32)
    G = 4
    all_std = _hand_std([float(r) for r in rewards])
    want = []
    for g in range(0, 12, G):
        group = [float(r) for r in rewards[g:g + G]]
        mean = sum(group) / G
        for r in group:
            a = r - mean
            want.append({"group": a / (_hand_std(group) + 1e-4), "batch": a / (all_std + 1e-4), "none": a}[scale])
    _close(losses.group_advantages(rewards, G, scale=scale), want)
    np.testing.assert_allclose(np.std(rewards.astype(np.float64), ddof=1), all_std)


def test_group_advantages_of_a_group_with_equal_rewards_are_zero():
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 3.0], np.float32)
    for scale in losses.SCALE_REWARDS:
        adv = np.asarray(losses.group_advantages(rewards, 3, scale=scale))
        assert np.all(adv[:3] == 0.0) and np.all(adv[3:] != 0.0)


def test_group_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match="groups of 4"):
        losses.group_advantages(np.zeros(6, np.float32), 4)
    with pytest.raises(ValueError, match="group, batch, none"):
        losses.group_advantages(np.zeros(6, np.float32), 3, scale="std")


@pytest.mark.parametrize("loss_type", losses.GRPO_LOSS_TYPES)
def test_token_weights_equal_the_hand_formula(arrays, loss_type):
    mask = arrays[4]
    _close(losses.token_weights(mask, loss_type, max_completion_len=T), _hand_weights(mask, loss_type, max_len=T))
    _close(losses.token_weights(mask, loss_type, max_completion_len=T, total_tokens=40),
           _hand_weights(mask, loss_type, max_len=T, total=40.0))


def test_token_weights_give_each_loss_types_normalisation(arrays):
    _, _, _, per_token, mask = arrays
    rows = [[float(per_token[b, t]) for t in range(T) if mask[b, t]] for b in range(B)]
    want = {"grpo": sum(sum(r) / len(r) for r in rows) / B,
            "dr_grpo": sum(sum(r) for r in rows) / (B * T),
            "dapo": sum(sum(r) for r in rows) / sum(len(r) for r in rows)}
    for loss_type, value in want.items():
        w = losses.token_weights(mask, loss_type, max_completion_len=T)
        _close(jnp.sum(per_token * w) / B, value)
    _close(losses.token_weights(mask, "token_mean"), losses.token_weights(mask, "dapo"))


@pytest.mark.parametrize("loss_type", losses.GRPO_LOSS_TYPES)
def test_token_weights_make_the_mean_over_micro_batches_the_whole_batch_loss(arrays, loss_type):
    _, _, _, per_token, mask = arrays
    w = np.asarray(losses.token_weights(mask, loss_type, max_completion_len=T, total_tokens=float(mask.sum())))
    whole = float(jnp.sum(per_token * w) / B)
    halves = [float(jnp.sum(per_token[s] * w[s]) / (B // 2)) for s in (slice(0, B // 2), slice(B // 2, B))]
    _close(sum(halves) / 2, whole)


def test_token_weights_reject_bad_arguments(arrays):
    mask = arrays[4]
    with pytest.raises(ValueError, match="max_completion_len"):
        losses.token_weights(mask, "dr_grpo")
    with pytest.raises(ValueError, match="grpo, dr_grpo, dapo, token_mean"):
        losses.token_weights(mask, "seq_mean")


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_the_hand_loop(arrays, beta):
    logps, old, ref, _, mask = arrays
    adv_B = np.array([0.7, -1.2, 0.3, -0.4], np.float32)
    weights = _hand_weights(mask, "grpo").astype(np.float32)
    loss, metrics = losses.grpo_loss(logps, old, ref, adv_B, weights, epsilon_low=0.2, epsilon_high=0.28, beta=beta)
    adv_BT = np.repeat(adv_B[:, None], T, axis=1)
    want_loss, want_metrics = _hand_policy(logps, old, adv_BT, weights, 0.2, 0.28)
    cells = _counted(weights)
    kls = {c: _hand_kl(logps[c], ref[c], "k3") for c in cells}
    want_loss += beta * sum(kls[c] * float(weights[c]) for c in cells) / B
    want_metrics["kl"] = sum(kls.values()) / len(cells)
    _close(loss, want_loss)
    assert set(metrics) == set(want_metrics)
    for name, want in want_metrics.items():
        _close(metrics[name], want)


def test_grpo_loss_without_a_reference(arrays):
    logps, old, _, _, mask = arrays
    adv_B = np.array([0.7, -1.2, 0.3, -0.4], np.float32)
    loss, metrics = losses.grpo_loss(logps, old, None, adv_B, mask)
    policy_loss, _ = losses.clipped_policy_loss(logps, old, np.repeat(adv_B[:, None], T, axis=1), mask)
    _close(loss, float(policy_loss))
    assert float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        losses.grpo_loss(logps, old, None, adv_B, mask, beta=0.1)
    _, at_ref = losses.grpo_loss(logps, logps, logps, adv_B, mask, beta=0.1)
    assert float(at_ref["kl"]) == 0.0 and float(at_ref["clip_fraction"]) == 0.0
