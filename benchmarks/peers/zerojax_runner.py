"""zerojax peer: ZeRO stage 0-3 on 2 devices; the reference GPT or a user's plain Flax GPT.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python3 zerojax_runner.py --stage S --work DIR
    zerojax launch --nproc 2 -- python3 zerojax_runner.py --stage 3 --work DIR

One process with 2 simulated CPU devices passes all 16 rows; under `zerojax launch` each
process (1 device) passes its own 8. Same optimizer and clipping as the PyTorch peers
(DeepSpeed config keys), fp32 or bf16 (PEERS_DTYPE), weight decay on every param, no
scheduler (constant lr), zerojax's defaults otherwise; `--cache DIR` uses a persistent
compilation cache. Each step is timed to `block_until_ready` of its metrics.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import zerojax  # noqa: E402
from zerojax import distributed  # noqa: E402
from common import BETAS, CLIP, DTYPE, EPS, LR, ROWS, WEIGHT_DECAY, report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True, choices=[0, 1, 2, 3])
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--remat", default="auto")
    ap.add_argument("--collectives", default="auto", choices=["auto", "xla", "bucketed"],
                    help="zerojax.collectives: XLA's per-array collectives or flat buckets")
    ap.add_argument("--cache", help="persistent compilation cache directory (zerojax.compilation_cache)")
    ap.add_argument("--model", choices=["reference", "user"], default="reference",
                    help="zerojax's reference GPT2, or user_gpt.py's plain Flax GPT (no zerojax calls)")
    args = ap.parse_args()

    distributed.initialize()                     # no-op outside `zerojax launch`
    from flax_gpt import make_model
    if args.model == "user":
        from user_gpt import make_model
    nproc, rank = jax.process_count(), jax.process_index()
    config = {
        "train_batch_size": ROWS, "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                  "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": DTYPE == "bf16"},
        "zerojax": {"remat": args.remat, "collectives": args.collectives, "weight_decay_mask": "all", "compilation_cache": args.cache},
    }
    engine = zerojax.initialize(model=make_model(os.path.join(args.work, "weights.npz")), config=config)
    data = np.load(os.path.join(args.work, "data.npy"))[: args.steps]
    rows = ROWS // nproc
    times, losses = [], []
    for i in range(args.steps):
        batch = {"input_ids": data[i, rank * rows:(rank + 1) * rows]}
        t0 = time.perf_counter()
        metrics = jax.block_until_ready(engine.train_step(batch))
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    name = f"zerojax{args.stage}" + ("-user" if args.model == "user" else "") + ("-mp" if nproc > 1 else "")
    report(name, rank, times, [float(x) for x in losses], args.warmup)


if __name__ == "__main__":
    main()
