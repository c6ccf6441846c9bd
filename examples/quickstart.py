"""Train a small byte-level Llama on Python's own standard-library sources with ZeRO-3.

    python examples/quickstart.py [--steps 400]

Needs no download: the corpus is the .py files of the running interpreter's stdlib.
The model is sharded over every local device (2 simulated CPU devices on a CPU-only host: one per core).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # On a CPU-only machine, split the host into devices so ZeRO-3 has something to shard over.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import numpy as np

import zerojax
from zerojax.data import TokenBatches, load_corpus
from zerojax.models import Llama, LlamaConfig

SEQ_LEN = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()

    train, val = load_corpus({"corpus": "stdlib", "seq_len": SEQ_LEN, "val_fraction": 0.01}, vocab_size=256)
    config = {
        "train_batch_size": 16,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps,
                                                              "warmup_num_steps": 20}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    model_cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=SEQ_LEN)
    engine = zerojax.initialize(model_fn=lambda rngs: Llama(model_cfg, rngs=rngs), config=config)
    rows = engine.batch_sizes.train_batch_size
    print(f"devices: {len(engine.mesh.devices.flat)}  mesh: {dict(engine.mesh.shape)}  "
          f"ZeRO stage 3  batch {rows}×{SEQ_LEN}", flush=True)

    train_batches = TokenBatches(train, SEQ_LEN, rows, seed=0)
    val_batch = TokenBatches(val, SEQ_LEN, rows, seed=1).next()

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        metrics = engine.train_step(train_batches.next())
        if step % 20 == 0 or step == 1:
            elapsed = time.perf_counter() - t0
            print(f"step {step:4d}  loss {float(metrics['loss']):.4f}  lr {float(metrics['lr']):.2e}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}  {step * rows * SEQ_LEN / elapsed:,.0f} tokens/s",
                  flush=True)
    val_loss = float(engine.eval_step(val_batch))
    print(f"validation loss {val_loss:.4f} (a uniform guess over bytes is {np.log(256):.4f})")
    sys.exit(0 if val_loss < np.log(256) else 1)


if __name__ == "__main__":
    main()
