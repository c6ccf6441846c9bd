"""Direct Preference Optimization: the policy learns from (prompt, chosen, rejected) pairs
against a frozen reference, with no reward model and no sampling.

`PolicyAndReference` is the module the engine trains: params {"policy", "reference"}, the
reference named in `zerojax_frozen`, so it is sharded exactly like the policy (ZeRO-3
shards it too), gets no optimizer state and zero updates, and runs in the same compiled
step under `stop_gradient`. With `precompute_ref` the reference's log-probs are computed
once before training (one forward pass over the data) and travel with the batches; the
step then runs the policy alone.
"""
from __future__ import annotations

import base64
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zerojax.config import ConfigError
from zerojax.rlhf import common, data as rdata, losses


class PolicyAndReference(nnx.Module):
    zerojax_frozen = ("reference",)

    def __init__(self, policy: nnx.Module, reference: nnx.Module, *, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        self.policy, self.reference = policy, reference
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.zerojax_casts_per_layer = bool(getattr(policy, "zerojax_casts_per_layer", False))

    @property
    def zerojax_model_section(self) -> dict | None:
        """The checkpoint is the policy's: served, exported and `init_from`-ed as the model."""
        return common.policy_model_section(self.policy)

    @staticmethod
    def _both(batch) -> tuple[jax.Array, jax.Array]:
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
        return ids, mask

    def reference_logps(self, batch) -> jax.Array:
        """[2B] the reference's response log-probs, chosen rows first."""
        ids, mask = self._both(batch)
        return losses.response_logps(self.reference.logits(ids), ids, mask)

    def __call__(self, batch) -> tuple[jax.Array, dict]:
        ids, mask = self._both(batch)
        B = batch["chosen_ids"].shape[0]
        logps = losses.response_logps(self.policy.logits(ids), ids, mask)
        if "ref_chosen_logps" in batch:
            ref = jnp.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        else:
            ref = jax.lax.stop_gradient(self.reference_logps(batch))
        return losses.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=self.beta, loss_type=self.loss_type,
                               label_smoothing=self.label_smoothing)


def collate_pairs(max_len: int, pad_id: int = 0):
    def collate(rows):
        chosen, rejected = rdata.pad_pairs(rows, max_len, pad_id)
        return {"chosen_ids": chosen["input_ids"], "chosen_mask": chosen["response_mask"],
                "rejected_ids": rejected["input_ids"], "rejected_mask": rejected["response_mask"]}
    return collate


class _WithReferenceLogps:
    """Batches plus the reference's precomputed log-probs of their pairs (by example index).

    The log-probs travel in the checkpoint's data state (float32 bytes, base64): a resumed
    run gets no fresh start in which to recompute them, and they are exact this way.
    """

    def __init__(self, batches: rdata.ExampleBatches, ref_logps: np.ndarray | None):
        self.batches, self.ref_logps = batches, ref_logps          # [examples, 2]

    def next(self):
        index = self.batches.index
        batch = self.batches.next()
        rows = self.batches.indices(index)[self.batches.first_row:self.batches.first_row + self.batches.rows]
        batch["ref_chosen_logps"] = self.ref_logps[rows, 0]
        batch["ref_rejected_logps"] = self.ref_logps[rows, 1]
        return batch

    def state(self):
        return {**self.batches.state(), REFERENCE_LOGPS: _encode_logps(self.ref_logps)}

    def restore(self, state):
        state = dict(state)
        encoded = state.pop(REFERENCE_LOGPS, None)
        if encoded is None:
            raise ConfigError("precompute_ref is set, but the checkpoint being resumed holds no precomputed "
                              "reference log-probs (it was trained without precompute_ref); unset it or start a "
                              "new run")
        self.ref_logps = _decode_logps(encoded, len(self.batches.examples))
        self.batches.restore(state)


REFERENCE_LOGPS = "reference_logps"


def _encode_logps(logps: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(logps, np.float32).tobytes()).decode("ascii")


def _decode_logps(text: str, examples: int) -> np.ndarray:
    logps = np.frombuffer(base64.b64decode(text), np.float32)
    if logps.size != 2 * examples:
        raise ConfigError(f"the checkpoint's reference log-probs cover {logps.size // 2} pairs, the data has "
                          f"{examples}: resume with the data it was trained on")
    return logps.reshape(examples, 2).copy()


def dpo(config: Any, *, steps: int | None = None, out: str | None = None, stream=None) -> dict:
    """DPO on `zerojax.rlhf.data` (prompt/chosen/rejected); reference = initial policy or `ref_from`."""
    from zerojax.trainer import load_model_params

    run = common.prepare(config, "dpo")
    s = run.settings
    pairs, report = common.preference_data(run)
    policy_fn, section = run.model_fn, run.model_section

    def model_fn(rngs):
        policy = policy_fn(rngs)
        return PolicyAndReference(policy, nnx.clone(policy), beta=s["beta"], loss_type=s["loss_type"],
                                  label_smoothing=s["label_smoothing"])

    collate = collate_pairs(s["max_len"], run.pad_id)
    batches = rdata.ExampleBatches(pairs, run.global_rows, collate, seed=run.config.zerojax.seed)
    data = batches

    def init_weights(engine):
        params = dict(engine.state.params)
        if section.get("init_from"):
            params["policy"] = load_model_params(engine, section["init_from"], "policy")
            params["reference"] = params["policy"]
        if s["ref_from"]:
            params["reference"] = load_model_params(engine, s["ref_from"], "reference")
        engine.set_params(params)
        if s["precompute_ref"]:
            data.ref_logps = _reference_logps(engine, pairs, collate)

    if s["precompute_ref"]:
        data = _WithReferenceLogps(batches, None)
    return common.train(run, data, report, model_fn=model_fn, steps=steps, out=out, stream=stream,
                        init_weights=init_weights)


def _reference_logps(engine, pairs: list, collate, rows: int = 16) -> np.ndarray:
    """[examples, 2] the reference's log-probs of every pair, one compiled forward per batch."""
    from zerojax import compute

    graphdef, state = engine.graphdef, engine.state

    @jax.jit
    def forward(params, batch):
        with compute.use(engine.policy):
            model = nnx.merge(graphdef, params, state.model_state)
            return model.reference_logps(batch)

    out = np.zeros((len(pairs), 2), np.float32)
    for start in range(0, len(pairs), rows):
        chunk = pairs[start:start + rows]
        chunk = chunk + [chunk[-1]] * (rows - len(chunk))                # one shape: one compile
        logps = np.asarray(forward(engine.state.params, collate(chunk)))
        n = min(rows, len(pairs) - start)
        out[start:start + n, 0], out[start:start + n, 1] = logps[:n], logps[rows:rows + n]
    return out
