"""Pipeline parallelism: step time, compiler temp bytes and bubble fraction vs micro-batches.

    python3 benchmarks/pipeline.py              # ~2-3 minutes on 2 cores
    python3 benchmarks/pipeline.py --steps 10   # timed steps per row (default 5)

Model: the reference `Llama` (vocab 256, hidden 128, intermediate 384, 8 layers, 4 heads),
fp32, AdamW, sequence 64, 4 rows per micro-batch, on 4 simulated CPU devices. For
stages P in {2, 4}, schedule in {gpipe, 1f1b} and micro-batches M in {P, 2P, 4P}
(`gradient_accumulation_steps`), the config is

    {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": M,
     "optimizer": {"type": "AdamW"}, "pipeline": {"stages": P, "schedule": ...},
     "zerojax": {"mesh": {"data": 1}}}

so the pipeline runs on the first P devices with a global batch of 4M rows. The peer for
each (P, M) is the non-pipelined step on the same P devices: `"zerojax": {"mesh": {"data":
P}}`, 4 / P rows per device per micro-batch, the same M and the same global batch.

Per row:
  - ms: median `engine.train_step(batch)` time over N steps after one warm-up step (which
    compiles), each timed to `block_until_ready`. CPU-simulated: relative only.
  - temp MiB: the compiler's per-device temp bytes from `engine.memory_report()` of an
    engine built with `abstract=True` (nothing allocated).
  - bubble: for each (P, schedule) a least-squares fit of T(M) = (M + k) t over the three M
    (no intercept), where M + k is the schedule's tick count: k = P - 1 for GPipe (the
    forward scan's M + P - 1 ticks; autodiff's backward replays them), k = 2P - 2 for 1F1B
    (M + 2P - 2 ticks, each one forward and one backward). Then measured bubble =
    1 - M t / T(M), next to the ideal (P - 1) / (M + P - 1).
"""
from __future__ import annotations

import sys


from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)
import _machine  # noqa: E402


DEVICES = 4
set_device_count(DEVICES)

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import zerojax  # noqa: E402
from zerojax.models import Llama, LlamaConfig  # noqa: E402

MiB = 2 ** 20
MICRO, SEQ = 4, 64                     # rows per micro-batch (divisible by every P), tokens
CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                  num_attention_heads=4, max_position_embeddings=SEQ)
STAGES = (2, 4)
SCHEDULES = ("gpipe", "1f1b")
STEPS = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 5


def ticks_extra(stages: int, schedule: str) -> int:
    """k in ticks = M + k: the scan length of each schedule in zerojax/pipeline.py."""
    return stages - 1 if schedule == "gpipe" else 2 * stages - 2


def config(stages: int, micro_batches: int, schedule: str | None) -> dict:
    base = {"gradient_accumulation_steps": micro_batches,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    if schedule is None:               # the peer: data parallel over the same P devices
        return {**base, "train_micro_batch_size_per_gpu": MICRO // stages,
                "zerojax": {"mesh": {"data": stages}}}
    return {**base, "train_micro_batch_size_per_gpu": MICRO,
            "pipeline": {"stages": stages, "schedule": schedule},
            "zerojax": {"mesh": {"data": 1}}}


def model_fn(rngs):
    return Llama(CFG, rngs=rngs)


def measure(cfg: dict, batch: dict) -> dict:
    """Median step ms (train_step) and compiler temp bytes (abstract engine's memory_report)."""
    temp = zerojax.initialize(model_fn=model_fn, config=cfg, example_batch=batch,
                              abstract=True).memory_report()["temp"]
    engine = zerojax.initialize(model_fn=model_fn, config=cfg, example_batch=batch)
    loss = float(jax.block_until_ready(engine.train_step(batch))["loss"])   # warm-up + compile
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        jax.block_until_ready(engine.train_step(batch))
        times.append(time.perf_counter() - t0)
    del engine
    return {"ms": 1e3 * float(np.median(times)), "temp": temp, "loss": loss}


def fit_tick(ms_by_m: dict[int, float], k: int) -> float:
    """Least-squares t in T(M) = (M + k) t (no intercept)."""
    x = np.array([m + k for m in ms_by_m], dtype=float)
    y = np.array(list(ms_by_m.values()), dtype=float)
    return float(x @ y / (x @ x))


def main() -> int:
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    print(_machine.describe())
    print(f"Llama (vocab {CFG.vocab_size}, hidden {CFG.hidden_size}, intermediate {CFG.intermediate_size}, "
          f"{CFG.num_hidden_layers} layers, {CFG.num_attention_heads} heads), fp32 AdamW, {MICRO} x {SEQ} "
          f"tokens per micro-batch, global batch {MICRO}M rows, {DEVICES} simulated CPU devices;\n"
          f"ms = CPU-simulated median of {STEPS} train_step calls after 1 warm-up (relative only: the "
          f"simulated devices share the host's cores, so stages run one after another)")
    results: dict[tuple, dict] = {}
    failed = 0
    for stages in STAGES:
        for m in (stages, 2 * stages, 4 * stages):
            batch = {"input_ids": rng.integers(0, CFG.vocab_size, (MICRO * m, SEQ), dtype=np.int32)}
            for schedule in (*SCHEDULES, None):
                try:
                    results[(stages, schedule, m)] = measure(config(stages, m, schedule), batch)
                except Exception as e:  # noqa: BLE001
                    failed += 1
                    print(f"P={stages} {schedule or 'data-parallel'} M={m}: ERROR {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}", flush=True)

    head = (f"{'P':>2} {'schedule':>8} {'k':>2} {'M':>3} | {'ms':>7} {'temp MiB':>8} | {'tick ms':>7} "
            f"{'bubble':>6} {'ideal':>6} | {'DP ms':>7} {'DP temp':>7} | {'ms/DP':>5} {'temp/DP':>7} | {'loss Δ':>7}")
    print(head)
    print("-" * len(head))
    for stages in STAGES:
        ms_list = (stages, 2 * stages, 4 * stages)
        for schedule in SCHEDULES:
            k = ticks_extra(stages, schedule)
            have = {m: results[(stages, schedule, m)]["ms"] for m in ms_list if (stages, schedule, m) in results}
            tick = fit_tick(have, k) if len(have) == len(ms_list) else None
            for m in ms_list:
                r, peer = results.get((stages, schedule, m)), results.get((stages, None, m))
                if r is None:
                    continue
                ideal = (stages - 1) / (m + stages - 1)
                bubble = f"{1 - m * tick / r['ms']:>6.2f}" if tick else f"{'-':>6}"
                tick_s = f"{tick:>7.2f}" if tick else f"{'-':>7}"
                if peer:
                    dp = (f"{peer['ms']:>7.1f} {peer['temp'] / MiB:>7.2f} | {r['ms'] / peer['ms']:>5.2f} "
                          f"{r['temp'] / max(peer['temp'], 1):>7.2f} | {abs(r['loss'] - peer['loss']):>7.1e}")
                else:
                    dp = f"{'-':>7} {'-':>7} | {'-':>5} {'-':>7} | {'-':>7}"
                print(f"{stages:>2} {schedule:>8} {k:>2} {m:>3} | {r['ms']:>7.1f} {r['temp'] / MiB:>8.2f} | "
                      f"{tick_s} {bubble} {ideal:>6.2f} | {dp}", flush=True)
    print("k: ticks = M + k (GPipe k = P - 1, forward scan; 1F1B k = 2P - 2, one forward + one backward per "
          "tick); tick ms: least-squares t of T(M) = (M + k) t\nover the three M; bubble = 1 - M t / T(M) "
          "(measured), ideal = (P - 1) / (M + P - 1); DP = the non-pipelined step on the same P devices "
          "(data P,\nsame global batch and M); ms/DP, temp/DP = pipeline / DP; loss Δ = |first-step loss - "
          "DP first-step loss| (same seed and batch)")
    print(f"{failed} rows failed; {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
