"""A training process for checkpoint tests that need their own device count or a SIGKILL.

    python -m tests.checkpoint_worker MODE --devices N [options]

Modes:
  resume     load --ckpt onto a fresh engine (--stage), train --steps more, write losses to --out
  save-loop  train one step, then save again and again until killed
  train      resume from --ckpt if it has a checkpoint, train to --steps saving every --every,
             print "step N" as it goes, write the final params to --out (.npz)
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["resume", "save-loop", "train"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--first-batch", type=int, default=0)
    parser.add_argument("--out")
    return parser.parse_args()


def config(stage: int) -> dict:
    return {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def main() -> None:
    args = parse()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    import jax

    import zerojax
    from zerojax.checkpoint import latest_tag, to_nested, path_name
    from tests.helpers import tiny_llama, token_batches

    batches = token_batches(64, 16)
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(args.stage))

    if args.mode == "resume":
        engine.load_checkpoint(args.ckpt)
        first = args.first_batch
        losses = [float(engine.train_step(b)["loss"]) for b in batches[first:first + args.steps]]
        with open(args.out, "w") as f:
            json.dump(losses, f)
    elif args.mode == "save-loop":
        engine.train_step(batches[0])
        engine.save_checkpoint(args.ckpt, tag="first")
        print("saved first", flush=True)
        i = 0
        while True:
            i += 1
            engine.save_checkpoint(args.ckpt, tag=f"loop{i % 3}")
    else:
        start = 0
        if latest_tag(args.ckpt) is not None:
            _, client = engine.load_checkpoint(args.ckpt)
            start = client["next_batch"]
        for step in range(start, args.steps):
            engine.train_step(batches[step])
            if (step + 1) % args.every == 0:
                engine.save_checkpoint(args.ckpt, client_state={"next_batch": step + 1})
            print(f"step {step + 1}", flush=True)
        flat = jax.tree_util.tree_flatten_with_path(to_nested(engine.state.params))[0]
        np.savez(args.out, **{path_name(p): np.asarray(x) for p, x in flat})
    sys.stdout.flush()


if __name__ == "__main__":
    main()
