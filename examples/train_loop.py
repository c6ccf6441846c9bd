"""Your own module and data through `zerojax.train`: the loop, eval, checkpoints, resume.

A tiny next-byte model (embedding -> MLP over the previous 4 bytes) on this file's own text.
`python examples/train_loop.py [OUT_DIR]` writes OUT_DIR/metrics.jsonl and checkpoints; a
rerun with the same OUT_DIR resumes from its latest checkpoint (a temp dir by default).
"""
import os
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import zerojax

CONTEXT, ROWS, SEQ = 4, 32, 64
TEXT = np.frombuffer(open(__file__, "rb").read(), np.uint8).astype(np.int32)


class NextByte(nnx.Module):
    def __init__(self, rngs):
        self.embed, self.out = nnx.Embed(256, 32, rngs=rngs), nnx.Linear(128, 256, rngs=rngs)
        self.hidden = nnx.Linear(CONTEXT * 32, 128, rngs=rngs)

    def __call__(self, batch):                   # input_ids [B, SEQ]: predict byte t from bytes t-4..t-1
        ids = batch["input_ids"]
        ctx = jnp.concatenate([self.embed(ids[:, i:SEQ - CONTEXT + i]) for i in range(CONTEXT)], -1)
        logits = self.out(nnx.gelu(self.hidden(ctx)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, CONTEXT:]).mean()


def batches(seed):                               # any iterable of dicts with train_batch_size rows
    rng = np.random.default_rng(seed)
    while True:
        yield {"input_ids": np.stack([TEXT[s:s + SEQ] for s in rng.integers(0, len(TEXT) - SEQ, ROWS)])}


config = {"train_batch_size": ROWS, "zero_optimization": {"stage": 2}, "steps_per_print": 50,
          "optimizer": {"type": "Adam", "params": {"lr": 3e-3}},
          "zerojax": {"data": {"seq_len": SEQ}, "train": {"eval_every": 100, "checkpoint_every": 100}}}
out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="zerojax-train-loop-")
summary = zerojax.train(NextByte, config, data=batches(seed=0), steps=200, out=out, eval_data=[next(batches(99))])
print({k: summary.get(k) for k in ("steps", "final_loss", "eval_loss", "out")})
sys.exit(0 if summary.get("eval_loss", 0.0) < 0.8 * np.log(256) else 1)   # no eval_loss: already trained
