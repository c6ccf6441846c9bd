"""Per-device memory of each ZeRO stage vs the ZeRO paper's formula; a 7B Llama compiled AOT.

    python3 benchmarks/zero_memory.py          # part (a), then part (b) in a subprocess
    python3 benchmarks/zero_memory.py --small  # part (a) only: 8 simulated CPU devices
    python3 benchmarks/zero_memory.py --aot    # part (b) only: 64 simulated CPU devices
    --remat full|minimal|none|auto             # activation policy for every stage (full)

(a) The reference Llama at three sizes (~1M, ~10M, ~50M params) on 8 simulated devices,
    ZeRO stages 0-3, fp32, AdamW, `stage3_param_persistence_threshold: 0`. Params, grads
    and optimizer bytes come from `engine.memory_report()` (the arrays' shards); temp is
    the compiler's temp allocation for the whole train step. The formula is the ZeRO
    paper's for fp32 master params + Adam, Ψ params over N devices:
        stage 0: params 4Ψ,   grads 4Ψ,   optimizer 8Ψ
        stage 1: params 4Ψ,   grads 4Ψ,   optimizer 8Ψ/N
        stage 2: params 4Ψ,   grads 4Ψ/N, optimizer 8Ψ/N
        stage 3: params 4Ψ/N, grads 4Ψ/N, optimizer 8Ψ/N
    A ratio of 1.00 means the layout is exactly the formula (optimizer bytes also hold a
    few scalars: Adam's step count and the injected hyperparameters).
(b) A ~7B Llama (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000) with
    bf16 compute on 64 simulated devices, stages 0-3, `abstract=True`: nothing is
    allocated, the train step is lowered from ShapeDtypeStructs and compiled ahead of time.
    Prints per-device GiB and compile seconds.

Notes: everything is abstract (`zerojax.initialize(..., abstract=True)`), so the numbers
are plans, not measurements of live buffers. CPU temp overstates GPU temp (bf16 dots run
in fp32, no fused attention). Under ZeRO 0-2 the full gradients are temporaries of the
step, so they show up inside temp as well as in the grads column.
"""
from __future__ import annotations

import os
import sys


from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)


AOT = "--aot" in sys.argv
SMALL_DEVICES, AOT_DEVICES = 8, 64
set_device_count(AOT_DEVICES if AOT else SMALL_DEVICES)

import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import zerojax  # noqa: E402
from zerojax.models import Llama, LlamaConfig  # noqa: E402

MiB, GiB = 2 ** 20, 2 ** 30

# Every dimension divides 8 so every tensor shards evenly (no param stays whole).
SIZES = {
    "llama-1M": LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384,
                            num_hidden_layers=4, num_attention_heads=4),
    "llama-10M": LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768,
                             num_hidden_layers=10, num_attention_heads=8),
    "llama-50M": LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                             num_hidden_layers=12, num_attention_heads=8),
}
SMALL_BATCH, SMALL_SEQ = 16, 128

LLAMA_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048)
AOT_BATCH, AOT_SEQ = 64, 2048          # one 2048-token row per device

# One activation policy for every stage, so temp differences come from ZeRO alone
# ("full": each layer is recomputed in the backward pass; ZeRO-3 needs it anyway).
REMAT = sys.argv[sys.argv.index("--remat") + 1] if "--remat" in sys.argv else "full"


def engine_for(cfg: LlamaConfig, stage: int, rows: int, seq: int, bf16: bool):
    config = {
        "train_batch_size": rows,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zerojax": {"remat": REMAT},
    }
    return zerojax.initialize(
        model_fn=lambda rngs: Llama(cfg, rngs=rngs), config=config,
        example_batch={"input_ids": jax.ShapeDtypeStruct((rows, seq), np.int32)}, abstract=True)


def formula(n_params: int, n: int, stage: int) -> dict[str, float]:
    """ZeRO paper, fp32 master params + Adam: bytes per device."""
    return {"params": 4 * n_params / (n if stage >= 3 else 1),
            "grads": 4 * n_params / (n if stage >= 2 else 1),
            "optimizer": 8 * n_params / (n if stage >= 1 else 1)}


def count_params(engine) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(engine.state.params))


def small_table() -> None:
    n = jax.device_count()
    print(f"(a) per-device MiB, {n} simulated CPU devices, fp32 + AdamW, batch {SMALL_BATCH} x "
          f"{SMALL_SEQ} tokens, remat {REMAT}, stage3_param_persistence_threshold 0")
    head = (f"{'model':<10} {'Ψ':>11} {'stage':>5} | {'params':>7} {'grads':>7} {'optim':>7} "
            f"{'temp':>7} {'args':>7} | {'f.params':>8} {'f.grads':>7} {'f.optim':>7} | "
            f"{'ratio P':>7} {'G':>5} {'O':>5} {'args/f(P+O)':>11}")
    print(head)
    print("-" * len(head))
    for name, cfg in SIZES.items():
        for stage in range(4):
            engine = engine_for(cfg, stage, SMALL_BATCH, SMALL_SEQ, bf16=False)
            psi = count_params(engine)
            r = engine.memory_report()
            f = formula(psi, n, stage)
            ratio = {k: r[k] / f[k] for k in f}
            args = r["arguments"] / (f["params"] + f["optimizer"])
            print(f"{name:<10} {psi:>11,} {stage:>5} | {r['params'] / MiB:>7.2f} {r['grads'] / MiB:>7.2f} "
                  f"{r['optimizer'] / MiB:>7.2f} {r['temp'] / MiB:>7.2f} {r['arguments'] / MiB:>7.2f} | "
                  f"{f['params'] / MiB:>8.2f} {f['grads'] / MiB:>7.2f} {f['optimizer'] / MiB:>7.2f} | "
                  f"{ratio['params']:>7.3f} {ratio['grads']:>5.3f} {ratio['optimizer']:>5.3f} {args:>11.3f}")
    print("params/grads/optim: engine.memory_report(), from each array's shard shape; temp, args: "
          "the compiler's temp\nand argument bytes for the step (args = params + optimizer state + "
          "batch shard + scalars);\nf.* = ZeRO formula; ratio = measured / formula")


def aot_table() -> None:
    n = jax.device_count()
    print(f"(b) ~7B Llama, bf16 compute (fp32 master), AdamW, {n} simulated CPU devices, batch "
          f"{AOT_BATCH} x {AOT_SEQ} tokens, remat {REMAT}, abstract state, AOT compile; per-device GiB")
    head = (f"{'stage':>5} | {'params':>7} {'grads':>7} {'optim':>7} {'temp':>7} {'P+O+temp':>8} | "
            f"{'formula P+G+O':>13} | {'compile s':>9}")
    print(head)
    print("-" * len(head))
    psi = None
    for stage in range(4):
        engine = engine_for(LLAMA_7B, stage, AOT_BATCH, AOT_SEQ, bf16=True)
        psi = count_params(engine)
        t0 = time.perf_counter()
        r = engine.memory_report()          # lowers and compiles the step once
        seconds = time.perf_counter() - t0
        params, grads, optim, temp = r["params"], r["grads"], r["optimizer"], r["temp"]
        f = sum(formula(psi, n, stage).values())
        print(f"{stage:>5} | {params / GiB:>7.2f} {grads / GiB:>7.2f} {optim / GiB:>7.2f} {temp / GiB:>7.2f} "
              f"{(params + optim + temp) / GiB:>8.2f} | {f / GiB:>13.2f} | {seconds:>9.1f}")
    print(f"Ψ = {psi:,} params; P+O+temp = what one device needs for the step (grads live in temp "
          "at every stage: they are produced and consumed inside it)")


def main() -> int:
    if AOT:
        aot_table()
        return 0
    small_table()
    if "--small" in sys.argv:
        return 0
    print(flush=True)
    # The device count is fixed when jax is imported: part (b) runs in its own process.
    return subprocess.run([sys.executable, os.path.abspath(__file__), "--aot", "--remat", REMAT]).returncode


if __name__ == "__main__":
    sys.exit(main())
