"""DeepSpeed's loop (`loss = engine(batch); engine.backward(loss); engine.step()`) vs the
fused `engine.train_step(batch)`, per optimizer step, on a small Llama.

    python3 benchmarks/deepspeed_loop.py                # 20 timed steps per contender
    python3 benchmarks/deepspeed_loop.py --steps 40

Model: the reference Llama (vocab 256, hidden 256, ffn 768, 4 layers, 4 heads), 16 rows x
128 tokens per optimizer step, fp32, AdamW, clip 1.0, ZeRO-2 on 2 simulated CPU devices
(one per core). Rows per step are fixed; gradient_accumulation_steps 1 and 2 split them
into 1 or 2 micro-batches (train_step scans them in one program; the loop runs one
forward+backward program per micro-batch, an in-place add, and the update program).
The contenders share one engine per gas value and alternate step by step (interleaved),
each step timed to `block_until_ready` of the state. Goal: loop / fused <= 1.10.
"""
from __future__ import annotations

from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)
import _machine  # noqa: E402

set_device_count(2)

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import zerojax.deepspeed as deepspeed  # noqa: E402
from zerojax.models import Llama, LlamaConfig  # noqa: E402

CFG = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128)
ROWS, SEQ = 16, 128


def make_engine(gas: int):
    config = {"train_batch_size": ROWS, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01}},
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=lambda rngs: Llama(CFG, rngs=rngs), config=config)
    return engine


def fused_step(engine, batch, gas):
    metrics = engine.train_step(batch)
    jax.block_until_ready((engine.state, metrics))
    return float(metrics["loss"])


def loop_step(engine, batch, gas):
    losses = []
    for m in range(gas):                       # train_step's split: row r in micro-batch r % gas
        loss = engine({k: v[m::gas] for k, v in batch.items()})
        engine.backward(loss)
        engine.step()
        losses.append(loss)
    jax.block_until_ready(engine.state)
    return float(np.mean([float(x) for x in losses]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, CFG.vocab_size, size=(ROWS, SEQ), dtype=np.int32)}
               for _ in range(4)]

    rows = []
    for gas in (1, 2):
        engine = make_engine(gas)
        contenders = {"train_step": fused_step, "loop": loop_step}
        compile_s = {}
        for name, run in contenders.items():
            t0 = time.perf_counter()
            for i in range(args.warmup):
                run(engine, batches[i % len(batches)], gas)
            compile_s[name] = time.perf_counter() - t0
        times = {name: [] for name in contenders}
        for i in range(args.steps):
            order = list(contenders.items())
            order = order if i % 2 == 0 else order[::-1]
            for name, run in order:
                t0 = time.perf_counter()
                run(engine, batches[i % len(batches)], gas)
                times[name].append(time.perf_counter() - t0)
        fused_ms = float(np.median(times["train_step"])) * 1e3
        for name in contenders:
            t = np.asarray(times[name]) * 1e3
            med = float(np.median(t))
            rows.append((gas, name, med, np.percentile(t, 10), np.percentile(t, 90),
                         ROWS * SEQ / med * 1e3, med / fused_ms, compile_s[name]))

    print(_machine.describe())
    print(f"{jax.device_count()} CPU devices, ZeRO-2, Llama vocab {CFG.vocab_size} hidden {CFG.hidden_size} "
          f"ffn {CFG.intermediate_size} layers {CFG.num_hidden_layers}, {ROWS} x {SEQ} tokens per optimizer "
          f"step, fp32, AdamW, {args.warmup} warm-up + {args.steps} timed steps each, interleaved")
    head = (f"{'gas':>3} | {'contender':<10} | {'median ms':>9} {'p10 ms':>8} {'p90 ms':>8} | {'tokens/s':>8} | "
            f"{'ratio':>6} | {'warm-up s':>9}")
    print(head)
    print("-" * len(head))
    for gas, name, med, p10, p90, tps, ratio, comp in rows:
        print(f"{gas:>3} | {name:<10} | {med:>9.1f} {p10:>8.1f} {p90:>8.1f} | {tps:>8.0f} | {ratio:>6.3f} | {comp:>9.1f}")
    print("ratio = median ms per optimizer step / train_step's median at the same gas (goal: loop <= 1.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
