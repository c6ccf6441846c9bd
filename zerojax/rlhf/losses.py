"""RLHF losses as pure functions of arrays (no modules, no engine), each tested against a
hand-written formula. Shapes: B sequences (or pairs), L tokens, V vocabulary; masks are
1 where a token counts. All math in fp32.

- `response_logps`: per-sequence sums of log p(token) over response tokens (HF shift:
  position t predicts token t+1), the quantity SFT, DPO and the rollouts share.
- `sft_loss`: mean next-token NLL over the response tokens of the batch.
- `pairwise_reward_loss`: Bradley-Terry `-log sigmoid(r_chosen - r_rejected)`
  (DeepSpeed-Chat step 2), with accuracy and margin.
- `dpo_loss`: DPO and its variants (TRL's `loss_type` names), with TRL's metric names.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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
