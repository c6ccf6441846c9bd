"""What every runner shares: the model shape, optimizer settings, weights, data and the result line.

The weights (`weights.npz`) and the data (`data.npy`) are written once by `run.py` into a
work folder and read by every runner, so all systems start from the same numbers and see
the same batches in the same order.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys

import numpy as np

# run.py passes the size and precision to every runner through the environment.
SIZES = {"small": (256, 4, 4), "large": (512, 8, 8)}          # d_model, layers, heads
SIZE = os.environ.get("PEERS_SIZE", "small")
DTYPE = os.environ.get("PEERS_DTYPE", "fp32")                 # "fp32" or "bf16" (mixed precision)
if SIZE not in SIZES or DTYPE not in ("fp32", "bf16"):
    raise SystemExit(f"PEERS_SIZE must be one of {sorted(SIZES)} and PEERS_DTYPE fp32 or bf16")
VOCAB, SEQ, ROWS = 256, 128, 16
D_MODEL, LAYERS, HEADS = SIZES[SIZE]
HEAD_DIM, D_FF = D_MODEL // HEADS, 4 * D_MODEL
LN_EPS = 1e-5
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.999), 1e-8, 0.01, 1.0
INIT_STD = 0.02
SEED = 0
TOKENS_PER_STEP = ROWS * SEQ

# Per-layer params in the stacked layout of zerojax's GPT2 (leading axis = layer).
LAYER_SHAPES = {
    "ln_1_scale": (D_MODEL,), "ln_1_bias": (D_MODEL,),
    "q_proj": (D_MODEL, HEADS, HEAD_DIM), "k_proj": (D_MODEL, HEADS, HEAD_DIM),
    "v_proj": (D_MODEL, HEADS, HEAD_DIM),
    "q_bias": (HEADS, HEAD_DIM), "k_bias": (HEADS, HEAD_DIM), "v_bias": (HEADS, HEAD_DIM),
    "attn_proj": (HEADS, HEAD_DIM, D_MODEL), "attn_proj_bias": (D_MODEL,),
    "ln_2_scale": (D_MODEL,), "ln_2_bias": (D_MODEL,),
    "c_fc": (D_MODEL, D_FF), "c_fc_bias": (D_FF,),
    "c_proj": (D_FF, D_MODEL), "c_proj_bias": (D_MODEL,),
}


def make_weights(path: str, seed: int = SEED) -> None:
    """GPT-2 init with numpy: N(0, 0.02) matrices, residual outputs N(0, 0.02/sqrt(2L)),
    zero biases, unit LayerNorm scales. Keys: `wte`, `wpe`, `ln_f_*`, `layers.<name>`."""
    rng = np.random.default_rng(seed)
    out_std = INIT_STD / np.sqrt(2 * LAYERS)
    w = {"wte": rng.normal(0, INIT_STD, (VOCAB, D_MODEL)),
         "wpe": rng.normal(0, INIT_STD, (SEQ, D_MODEL))}
    for name, shape in LAYER_SHAPES.items():
        shape = (LAYERS, *shape)
        if name.endswith("_scale"):
            w[f"layers.{name}"] = np.ones(shape)
        elif name.endswith("bias"):
            w[f"layers.{name}"] = np.zeros(shape)
        else:
            std = out_std if name in ("attn_proj", "c_proj") else INIT_STD
            w[f"layers.{name}"] = rng.normal(0, std, shape)
    w["ln_f_scale"], w["ln_f_bias"] = np.ones(D_MODEL), np.zeros(D_MODEL)
    np.savez(path, **{k: v.astype(np.float32) for k, v in w.items()})


def make_data(path: str, steps: int) -> None:
    """`steps` batches of ROWS consecutive, non-overlapping SEQ-byte windows of the Python
    standard library's own .py files (sorted by name), as uint8 -> int32 [steps, ROWS, SEQ]."""
    need = steps * ROWS * SEQ
    root = os.path.dirname(os.__file__)
    chunks, have = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                chunks.append(f.read())
            have += len(chunks[-1])
            if have >= need:
                break
    data = np.frombuffer(b"".join(chunks)[:need], dtype=np.uint8).astype(np.int32)
    np.save(path, data.reshape(steps, ROWS, SEQ))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def report(system: str, rank: int, step_times: list[float], losses: list[float], warmup: int) -> None:
    """One `RESULT {json}` line per process; run.py keeps rank 0's times and the max RSS."""
    timed = step_times[warmup:]
    med = statistics.median(timed)
    print("RESULT " + json.dumps({
        "system": system, "rank": rank, "steps": len(step_times), "timed_steps": len(timed),
        "median_step_s": med, "tokens_per_s": TOKENS_PER_STEP / med,
        "first_step_s": step_times[0], "peak_rss_mib": peak_rss_mib(), "step_times": timed,
        "losses": [float(x) for x in losses], "final_loss": float(losses[-1]),
    }), flush=True)
    sys.stdout.flush()
