"""RLHF losses as pure functions of arrays (no modules, no engine), each tested against a
hand-written formula. Shapes: B sequences (or pairs), L tokens, V vocabulary; masks are
1 where a token counts. All math in fp32.

- `response_logps`: per-sequence sums of log p(token) over response tokens (HF shift:
  position t predicts token t+1), the quantity SFT, DPO and the rollouts share.
- `sft_loss`: mean next-token NLL over the response tokens of the batch.
- `pairwise_reward_loss`: Bradley-Terry `-log sigmoid(r_chosen - r_rejected)`
  (DeepSpeed-Chat step 2), with accuracy and margin.
- `dpo_loss`: DPO and its variants (TRL's `loss_type` names), with TRL's metric names.

Policy-gradient losses (PPO as in DeepSpeed-Chat step 3, GRPO as in TRL's GRPOTrainer).
T is the completion length; per-token tensors are [B, T] with a mask or weights per token:
- `kl_per_token`: Schulman's k1/k2/k3 estimates of KL(policy || reference) at sampled tokens.
- `masked_mean`, `masked_whiten`: statistics over masked elements only (TRL's helpers).
- `gae`: generalised advantage estimation over each row's masked tokens -> (advantages, returns).
- `clipped_policy_loss`: PPO's clipped surrogate, with clip-fraction, ratio and approx-KL metrics.
- `value_loss`: PPO's clipped value loss.
- `group_advantages`: GRPO's group-relative advantages (scaled by the group's, the batch's or
  no standard deviation).
- `token_weights`: per-token weights that make `sum(per_token * w) / B` each loss type's
  normalisation (per sequence, per fixed length, per token of the whole batch), so that the
  mean over equal-size micro-batches of their losses is the whole batch's loss.
- `grpo_loss`: TRL's GRPO loss: the clipped surrogate with one advantage per row plus a k3
  penalty towards the reference.
Tokens with weight 0 never reach an `exp`: padding may hold any value (even inf) and still
gives a finite loss and a zero gradient there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def token_logps(logits_BLV: jax.Array, input_ids_BL: jax.Array) -> jax.Array:
    """[B, L] log p(input_ids[:, t+1] | ..t) at position t; the last position gives 0.

    The target's logit is a masked sum over the vocabulary (not a gather), so a vocabulary
    sharded over `tensor` reduces locally and all-reduces [B, L] numbers only.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    targets_BL = jnp.concatenate([input_ids_BL[:, 1:], jnp.zeros_like(input_ids_BL[:, :1])], axis=1)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BLV.shape, 2)
    target_logit_BL = jnp.sum(jnp.where(vocab_ids == targets_BL[..., None], logits_BLV, 0.0), axis=-1)
    logps_BL = target_logit_BL - jax.nn.logsumexp(logits_BLV, axis=-1)
    last = jnp.arange(input_ids_BL.shape[1]) == input_ids_BL.shape[1] - 1
    return jnp.where(last[None, :], 0.0, logps_BL)


def predicts_response(response_mask_BL: jax.Array) -> jax.Array:
    """[B, L] 1 where position t predicts a response token (token t+1 is one)."""
    shifted = jnp.concatenate([response_mask_BL[:, 1:], jnp.zeros_like(response_mask_BL[:, :1])], axis=1)
    return shifted.astype(jnp.float32)


def response_logps(logits_BLV: jax.Array, input_ids_BL: jax.Array, response_mask_BL: jax.Array) -> jax.Array:
    """[B] sum of log-probs of each sequence's response tokens."""
    return jnp.sum(token_logps(logits_BLV, input_ids_BL) * predicts_response(response_mask_BL), axis=1)


def sft_loss(logits_BLV: jax.Array, input_ids_BL: jax.Array, response_mask_BL: jax.Array) -> jax.Array:
    """Mean NLL over every response token of the batch (prompt and padding masked)."""
    counted = predicts_response(response_mask_BL)
    total = -jnp.sum(token_logps(logits_BLV, input_ids_BL) * counted)
    return total / jnp.maximum(jnp.sum(counted), 1.0)


def pairwise_reward_loss(chosen_B: jax.Array, rejected_B: jax.Array) -> tuple[jax.Array, dict]:
    """`mean(-log sigmoid(r_chosen - r_rejected))`; accuracy = share with chosen > rejected."""
    margin_B = chosen_B.astype(jnp.float32) - rejected_B.astype(jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_B))
    return loss, {"accuracy": jnp.mean((margin_B > 0).astype(jnp.float32)), "margin": jnp.mean(margin_B),
                  "chosen_score": jnp.mean(chosen_B), "rejected_score": jnp.mean(rejected_B)}


def dpo_loss(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
             ref_rejected_B: jax.Array, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """DPO from sequence log-probs of the policy and the frozen reference.

    h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin.
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  (cDPO smoothing)
    ipo:     (h - 1 / (2 beta))^2
    hinge:   relu(1 - beta h)
    Rewards are beta * (policy - reference) log-ratios, as TRL logs them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: choose one of {', '.join(DPO_LOSS_TYPES)}")
    f32 = lambda x: x.astype(jnp.float32)
    chosen_ratio = f32(policy_chosen_B) - f32(ref_chosen_B)
    rejected_ratio = f32(policy_rejected_B) - f32(ref_rejected_B)
    h_B = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
    elif loss_type == "ipo":
        losses = (h_B - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = jax.nn.relu(1.0 - beta * h_B)
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    metrics = {"rewards/chosen": jnp.mean(chosen_rewards), "rewards/rejected": jnp.mean(rejected_rewards),
               "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
               "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
               "logps/chosen": jnp.mean(f32(policy_chosen_B)), "logps/rejected": jnp.mean(f32(policy_rejected_B))}
    return jnp.mean(losses), metrics


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def kl_per_token(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token KL(policy || reference) estimate from sampled tokens' log-probs (Schulman's k1/k2/k3).

    k1 = logps - ref ; k2 = 0.5 * (logps - ref)**2 ; k3 = exp(ref - logps) - (ref - logps) - 1.
    k1 is unbiased but signed, k2 low-variance but biased, k3 unbiased and >= 0 (TRL's GRPO).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: choose one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = _f32(logps) - _f32(ref_logps)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    return jnp.exp(-log_ratio) + log_ratio - 1.0


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1), over everything or per `axis`."""
    mask = _f32(mask)
    return jnp.sum(_f32(x) * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked elements, times mask.

    var is unbiased (n / (n - 1)) like TRL's `masked_var`; with one masked element it stays
    biased (0) instead of failing. Without `shift_mean` the mean is added back.
    """
    x, mask = _f32(x), _f32(mask)
    mean = masked_mean(x, mask)
    n = jnp.sum(mask)
    var = masked_mean((x - mean) ** 2, mask) * jnp.where(n > 1.0, n / jnp.maximum(n - 1.0, 1.0), 1.0)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation per row -> (advantages_BT, returns_BT).

    Backward over t: next_value = values[t+1] if t+1 < T and mask[t+1] else 0;
    delta_t = r_t + gamma * next_value - V_t; A_t = delta_t + gamma * lam * A_{t+1} * mask[t+1];
    returns = A + V. Both are 0 where mask is 0, and those positions feed nothing back.
    """
    rewards_BT, values_BT, mask_BT = _f32(rewards_BT), _f32(values_BT), _f32(mask_BT)
    next_mask_BT = jnp.concatenate([mask_BT[:, 1:], jnp.zeros_like(mask_BT[:, :1])], axis=1)
    next_values_BT = jnp.concatenate([values_BT[:, 1:], jnp.zeros_like(values_BT[:, :1])], axis=1) * next_mask_BT
    deltas_BT = rewards_BT + gamma * next_values_BT - values_BT

    def step(next_adv_B, xs):
        delta_B, next_mask_B = xs
        adv_B = delta_B + gamma * lam * next_adv_B * next_mask_B
        return adv_B, adv_B

    _, advantages_TB = jax.lax.scan(step, jnp.zeros_like(deltas_BT[:, 0]), (deltas_BT.T, next_mask_BT.T),
                                    reverse=True)
    advantages_BT = advantages_TB.T * mask_BT
    return advantages_BT, (advantages_BT + values_BT) * mask_BT


def _counted_stats(counted_BT: jax.Array, values: dict) -> dict:
    """Means over counted tokens of each boolean/float array in `values`."""
    return {name: masked_mean(v.astype(jnp.float32), counted_BT) for name, v in values.items()}


def clipped_policy_loss(logps_BT: jax.Array, old_logps_BT: jax.Array, advantages_BT: jax.Array,
                        weights_BT: jax.Array, *, clip_low: float = 0.2,
                        clip_high: float | None = None) -> tuple[jax.Array, dict]:
    """PPO's clipped surrogate: per_token = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A).

    ratio = exp(logps - old); clip_high None means clip_low. loss = sum(per_token * weights) / B
    (see `token_weights` for the normalisations). Metrics are over counted tokens (weight > 0):
    clip_fraction (clip active: ratio below 1 - clip_low with A < 0, or above 1 + clip_high with
    A > 0), clip_ratio/low_mean, clip_ratio/high_mean, approx_kl (mean 0.5 (logps - old)^2),
    ratio_mean, ratio_min, ratio_max (0 with no counted token).
    """
    clip_high = clip_low if clip_high is None else clip_high
    weights_BT = _f32(weights_BT)
    advantages_BT = _f32(advantages_BT)
    counted_BT = weights_BT > 0
    log_ratio_BT = jnp.where(counted_BT, _f32(logps_BT) - _f32(old_logps_BT), 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    per_token_BT = -jnp.minimum(ratio_BT * advantages_BT, clipped_BT * advantages_BT)
    loss = jnp.sum(per_token_BT * weights_BT) / weights_BT.shape[0]

    low_BT = (ratio_BT < 1.0 - clip_low) & (advantages_BT < 0)
    high_BT = (ratio_BT > 1.0 + clip_high) & (advantages_BT > 0)
    any_counted = jnp.any(counted_BT)
    metrics = _counted_stats(counted_BT, {"clip_fraction": low_BT | high_BT, "clip_ratio/low_mean": low_BT,
                                          "clip_ratio/high_mean": high_BT, "approx_kl": 0.5 * log_ratio_BT ** 2,
                                          "ratio_mean": ratio_BT})
    metrics["ratio_min"] = jnp.where(any_counted, jnp.min(jnp.where(counted_BT, ratio_BT, jnp.inf)), 0.0)
    metrics["ratio_max"] = jnp.where(any_counted, jnp.max(jnp.where(counted_BT, ratio_BT, -jnp.inf)), 0.0)
    return loss, metrics


def value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array, weights_BT: jax.Array,
               *, clip: float = 0.2) -> tuple[jax.Array, dict]:
    """PPO's clipped value loss: per_token = 0.5 max((V - R)^2, (Vclip - R)^2), with
    Vclip = old + clip(V - old, -clip, clip); loss = sum(per_token * weights) / B.
    Metrics over counted tokens: vf_clip_fraction (share where the clipped term is the larger),
    value_mean.
    """
    values_BT, old_values_BT, returns_BT, weights_BT = map(_f32, (values_BT, old_values_BT, returns_BT, weights_BT))
    counted_BT = weights_BT > 0
    vclip_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip, clip)
    unclipped_sq_BT = (values_BT - returns_BT) ** 2
    clipped_sq_BT = (vclip_BT - returns_BT) ** 2
    per_token_BT = jnp.where(counted_BT, 0.5 * jnp.maximum(unclipped_sq_BT, clipped_sq_BT), 0.0)
    loss = jnp.sum(per_token_BT * weights_BT) / weights_BT.shape[0]
    return loss, _counted_stats(counted_BT, {"vf_clip_fraction": clipped_sq_BT > unclipped_sq_BT,
                                             "value_mean": values_BT})


def _unbiased_std(x: jax.Array, axis=None) -> jax.Array:
    """Sample standard deviation (torch.std's n - 1); 0 for a single element instead of nan."""
    n = x.size if axis is None else x.shape[axis]
    return jnp.sqrt(jnp.sum((x - jnp.mean(x, axis=axis, keepdims=True)) ** 2, axis=axis) / max(n - 1, 1))


def group_advantages(rewards_B: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> jax.Array:
    """[B] GRPO advantages of consecutive groups of `group_size` completions of one prompt.

    A = r - mean(group); scale "group" divides by (std(group) + eps), "batch" by
    (std(all rewards) + eps), "none" by nothing; std is unbiased like torch.std (a group of one
    gives std 0, not nan). TRL GRPOTrainer's formula.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale {scale!r}: choose one of {', '.join(SCALE_REWARDS)}")
    rewards_B = _f32(rewards_B)
    B = rewards_B.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"{B} rewards do not split into groups of {group_size}")
    rewards_GN = rewards_B.reshape(B // group_size, group_size)
    advantages_GN = rewards_GN - jnp.mean(rewards_GN, axis=1, keepdims=True)
    if scale == "group":
        advantages_GN = advantages_GN / (_unbiased_std(rewards_GN, axis=1)[:, None] + eps)
    elif scale == "batch":
        advantages_GN = advantages_GN / (_unbiased_std(rewards_B) + eps)
    return advantages_GN.reshape(B)


def token_weights(mask_BT: jax.Array, loss_type: str, *, max_completion_len: int | None = None,
                  total_tokens=None) -> jax.Array:
    """[B, T] weights that turn `sum(per_token * w) / B` into each normalisation.

    grpo:    mask / max(row token count, 1)   (mean over each sequence, then over sequences)
    dr_grpo: mask / max_completion_len        (a constant length; required)
    dapo:    mask * B / total_tokens          (mean over the batch's tokens; total_tokens defaults
                                              to mask.sum(), pass the global count when the
                                              rows are a shard of a larger batch)
    "token_mean" is a synonym of "dapo" (PPO's normalisation). Computed once over the whole
    batch, the mean over equal-size micro-batches of `sum(per_token * w_micro) / B_micro` is the
    whole batch's loss.
    """
    mask_BT = _f32(mask_BT)
    if loss_type == "grpo":
        return mask_BT / jnp.maximum(jnp.sum(mask_BT, axis=1, keepdims=True), 1.0)
    if loss_type == "dr_grpo":
        if max_completion_len is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_len")
        return mask_BT / float(max_completion_len)
    if loss_type in ("dapo", "token_mean"):
        total = jnp.sum(mask_BT) if total_tokens is None else _f32(total_tokens)
        return mask_BT * mask_BT.shape[0] / jnp.maximum(total, 1.0)
    raise ValueError(f"loss_type {loss_type!r}: choose one of {', '.join(GRPO_LOSS_TYPES + ('token_mean',))}")


def grpo_loss(logps_BT: jax.Array, old_logps_BT: jax.Array, ref_logps_BT: jax.Array | None,
              advantages_B: jax.Array, weights_BT: jax.Array, *, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0) -> tuple[jax.Array, dict]:
    """TRL's GRPO loss: per_token = the clipped surrogate with each row's advantage on all its
    tokens + beta * k3(logps, ref); loss = sum(per_token * weights) / B.

    ref_logps may be None when beta == 0. Metrics: `clipped_policy_loss`'s plus "kl", the mean
    k3 over counted tokens (0.0 without a reference).
    """
    advantages_BT = jnp.broadcast_to(_f32(advantages_B)[:, None], jnp.shape(logps_BT))
    loss, metrics = clipped_policy_loss(logps_BT, old_logps_BT, advantages_BT, weights_BT,
                                        clip_low=epsilon_low, clip_high=epsilon_high)
    if ref_logps_BT is None:
        if isinstance(beta, (int, float)) and beta == 0:
            metrics["kl"] = jnp.zeros((), jnp.float32)
            return loss, metrics
        raise ValueError("grpo_loss with beta != 0 needs ref_logps")
    weights_BT = _f32(weights_BT)
    counted_BT = weights_BT > 0
    kl_BT = kl_per_token(jnp.where(counted_BT, _f32(logps_BT), 0.0), jnp.where(counted_BT, _f32(ref_logps_BT), 0.0),
                         "k3")
    loss = loss + beta * jnp.sum(kl_BT * weights_BT) / weights_BT.shape[0]
    metrics["kl"] = masked_mean(kl_BT, counted_BT)
    return loss, metrics
