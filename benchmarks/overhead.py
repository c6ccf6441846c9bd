"""zerojax's train step vs a hand-written `jax.jit` step of the same model, on one device.

    python3 benchmarks/overhead.py                 # 30 timed steps each (default)
    python3 benchmarks/overhead.py --steps 50      # more steps, tighter medians
    python3 benchmarks/overhead.py --no-stage3     # skip the ZeRO-3 row
    python3 benchmarks/overhead.py --diagnose      # also: HLO op counts, step without the batch transfer

Model: the reference Llama (vocab 256, hidden 256, intermediate 768, 4 layers, 4 heads),
16 rows x 128 tokens, fp32, AdamW (lr 3e-4, weight decay 0.01), gradient clipping 1.0.

Contenders, each starting from the same initial params and fed the same host (numpy)
batches in the same order:
  hand-written  nnx.split the model; jit(value_and_grad of the loss, DeepSpeed-style
                clipping coef = clip / (norm + 1e-6) capped at 1, optax.adamw), params and
                optimizer state donated; the batch goes through jax.device_put each step.
  zerojax 0     `engine.train_step(batch)`, ZeRO stage 0, `"zerojax": {"remat": "none"}`.
  zerojax 3     the same at ZeRO stage 3 (one device: the ZeRO-3 code path with nothing to
                shard, so it measures the plumbing).
The contenders alternate step by step (interleaved), so machine noise hits all alike.
Each step is timed to `block_until_ready` of everything it returns. Reported: median
ms/step, tokens/s and the ratio to the hand-written step (goal: <= 1.05), plus the largest
loss difference from the hand-written run (same math, so ~1e-6).
"""
from __future__ import annotations

import sys

from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)
import _machine  # noqa: E402

set_device_count(1)

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax  # noqa: E402
from zerojax.models import Llama, LlamaConfig  # noqa: E402

CFG = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128)
ROWS, SEQ = 16, 128
LR, WEIGHT_DECAY, CLIP = 3e-4, 0.01, 1.0
SEED = 0


def make_batches(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, CFG.vocab_size, size=(ROWS, SEQ), dtype=np.int32)}
            for _ in range(count)]


# ------------------------------------------------------------------------- contenders

class HandWritten:
    """The step a JAX user would write by hand for this model."""

    name = "hand-written jax.jit"

    def __init__(self):
        model = Llama(CFG, rngs=nnx.Rngs(SEED))
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # From host numpy, so the donated buffers are the jit's own.
        self.params = jax.device_put(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
        self.rest = nnx.to_pure_dict(rest)
        self.tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
        self.opt_state = jax.jit(self.tx.init)(self.params)
        graphdef, rest_state, tx = self.graphdef, self.rest, self.tx

        def loss_fn(p, batch):
            return nnx.merge(graphdef, p, rest_state)(batch)

        def step(p, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(p, batch)
            norm = optax.tree.norm(grads)
            coef = jnp.minimum(CLIP / (norm + 1e-6), 1.0)
            grads = jax.tree.map(lambda g: g * coef, grads)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss, norm

        self.jitted = jax.jit(step, donate_argnums=(0, 1))

    def step(self, batch) -> float:
        self.params, self.opt_state, loss, norm = self.jitted(self.params, self.opt_state,
                                                              jax.device_put(batch))
        jax.block_until_ready((self.params, self.opt_state, loss, norm))
        return loss

    def compiled_text(self, batch) -> str:
        return self.jitted.lower(self.params, self.opt_state, jax.device_put(batch)).compile().as_text()


class ZeroJax:
    def __init__(self, stage: int):
        self.name = f"zerojax stage {stage}"
        config = {
            "train_batch_size": ROWS,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": WEIGHT_DECAY}},
            "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage},
            "zerojax": {"remat": "none", "seed": SEED},
        }
        self.engine = zerojax.initialize(model_fn=lambda rngs: Llama(CFG, rngs=rngs), config=config)

    def step(self, batch) -> float:
        metrics = self.engine.train_step(batch)
        jax.block_until_ready((self.engine.state, metrics))
        return metrics["loss"]

    def step_on_device(self, batch) -> None:
        """The compiled step alone, with the batch already placed (no shard_batch)."""
        self.engine.state, metrics = self.engine._train_step(self.engine.state, batch)
        jax.block_until_ready((self.engine.state, metrics))

    def compiled_text(self, batch) -> str:
        return self.engine.lower_train_step(batch).compile().as_text()


# ------------------------------------------------------------------------- measurement

def hlo_op_counts(text: str) -> collections.Counter:
    """Opcode -> count over every computation of a compiled HLO module."""
    counts = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = [^=]*?\s([a-z][a-z0-9\-]*)\(", line)
        if m:
            counts[m.group(1)] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender")
    parser.add_argument("--no-stage3", action="store_true", help="skip the ZeRO-3 row")
    parser.add_argument("--diagnose", action="store_true",
                        help="print HLO op counts and time the engine's step without the batch transfer")
    args = parser.parse_args()

    batches = make_batches(8)
    contenders = [HandWritten(), ZeroJax(0)] + ([] if args.no_stage3 else [ZeroJax(3)])
    compile_s = {}
    for c in contenders:
        t0 = time.perf_counter()
        c.step(batches[0])                       # compile + first step
        compile_s[c.name] = time.perf_counter() - t0
    for i in range(1, args.warmup):
        for c in contenders:
            c.step(batches[i % len(batches)])

    times = {c.name: [] for c in contenders}
    losses = {c.name: [] for c in contenders}
    for i in range(args.steps):
        batch = batches[(args.warmup + i) % len(batches)]
        order = contenders if i % 2 == 0 else contenders[::-1]   # no fixed "goes first" slot
        for c in order:
            t0 = time.perf_counter()
            loss = c.step(batch)
            times[c.name].append(time.perf_counter() - t0)
            losses[c.name].append(float(loss))

    ref = contenders[0].name
    ref_ms = statistics.median(times[ref]) * 1e3
    tokens = ROWS * SEQ
    print(_machine.describe())
    print(f"one {jax.devices()[0].platform.upper()} device, Llama vocab {CFG.vocab_size} hidden "
          f"{CFG.hidden_size} ffn {CFG.intermediate_size} layers {CFG.num_hidden_layers} heads "
          f"{CFG.num_attention_heads}, {ROWS} x {SEQ} tokens/step, fp32, AdamW, clip {CLIP}, "
          f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved")
    head = (f"{'contender':<22} | {'median ms':>9} {'p10 ms':>8} {'p90 ms':>8} | {'tokens/s':>8} | "
            f"{'ratio':>6} | {'compile+1st s':>13} | {'max |Δloss|':>11}")
    print(head)
    print("-" * len(head))
    for c in contenders:
        t = np.asarray(times[c.name]) * 1e3
        med = float(np.median(t))
        dloss = max(abs(a - b) for a, b in zip(losses[c.name], losses[ref]))
        print(f"{c.name:<22} | {med:>9.1f} {np.percentile(t, 10):>8.1f} {np.percentile(t, 90):>8.1f} | "
              f"{tokens / med * 1e3:>8.0f} | {med / ref_ms:>6.3f} | {compile_s[c.name]:>13.1f} | "
              f"{dloss:>11.2e}")
    print("ratio = median ms/step / hand-written median (goal <= 1.05); Δloss vs the hand-written run")

    if args.diagnose:
        diagnose(contenders, batches, args.steps)
    return 0


def diagnose(contenders, batches, steps: int) -> None:
    hand, engines = contenders[0], contenders[1:]
    print("\ncompiled HLO op counts (opcodes whose counts differ)")
    counts = {c.name: hlo_op_counts(c.compiled_text(batches[0])) for c in contenders}
    ops = sorted({op for cnt in counts.values() for op in cnt
                  if len({cnt_.get(op, 0) for cnt_ in counts.values()}) > 1})
    print(f"{'op':<24}" + "".join(f" {c.name:>22}" for c in contenders))
    for op in ops + ["TOTAL"]:
        row = [sum(cnt.values()) if op == "TOTAL" else cnt.get(op, 0) for cnt in counts.values()]
        print(f"{op:<24}" + "".join(f" {v:>22}" for v in row))

    print("\nengine step without the per-step host->device batch transfer (interleaved)")
    placed = [engines[0].engine.shard_batch(b) for b in batches]    # same sharding for every engine
    times = collections.defaultdict(list)
    for i in range(steps):
        for c in contenders:
            t0 = time.perf_counter()
            if c is hand:
                c.step(batches[i % len(batches)])
            else:
                c.step_on_device(placed[i % len(placed)])
            times[c.name].append(time.perf_counter() - t0)
    ref = statistics.median(times[hand.name])
    for c in contenders:
        med = statistics.median(times[c.name])
        print(f"{c.name:<22} {med * 1e3:>9.1f} ms  ratio {med / ref:.3f}")


if __name__ == "__main__":
    sys.exit(main())
