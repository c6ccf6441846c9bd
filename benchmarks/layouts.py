"""Every valid (data, sequence, tensor, ZeRO) layout of one Llama on 8 simulated CPU devices.

    python3 benchmarks/layouts.py               # ZeRO 0 and 3: 32 layouts, ~2 minutes on 2 cores
    python3 benchmarks/layouts.py --all-stages  # ZeRO 0-3: 64 layouts (1 and 2 untimed), ~4 minutes
    python3 benchmarks/layouts.py --steps 10    # timed steps per layout (default 5)

Model: the reference `Llama` (vocab 256, hidden 128, intermediate 384, 2 layers, 8 heads,
4 K/V heads), fp32, AdamW, batch 16 x 128 tokens, `stage3_param_persistence_threshold: 0`.
Layouts: tensor t and sequence s in {1, 2, 4, 8}, data = 8 / (t * s), keeping those where
16 rows divide by data, 128 tokens by s and 8 heads by t; ZeRO stages 0-3; for s > 1 both
sequence-parallel strategies (ulysses, ring): 16 meshes x 2 stages = 32 layouts by default,
x 4 stages = 64 with --all-stages (each layout costs one 2-4 s compilation).

Each layout's train step is lowered and compiled once (`engine.lower_train_step(batch)`).
That one executable gives:
  - args, temp: the compiler's per-device argument and temp bytes (`memory_analysis()`,
    the same numbers `engine.memory_report()` reports as `arguments` and `temp`);
  - collective bytes: from `compiled.as_text()`, for every all-reduce, all-gather,
    reduce-scatter, all-to-all and collective-permute the bytes of its result shape (tuple
    results summed; async pairs counted once, at the `-done` op, whose result is the output).
    Per-kind columns count every op once, including ops inside while-loop bodies (the
    scanned layers, forward and backward); `total x trips` multiplies loop-body ops by the
    loop's `known_trip_count`, i.e. the bytes one step really moves;
  - the first-step loss, compared with the data-parallel ZeRO-0 loss of a normally built
    engine (`engine.train_step`). The layout engines are built with `abstract=True` and start
    from that engine's initial state, `jax.device_put` onto their own shardings, so the
    comparison is of the step's math, not of the initialisation (and no layout pays for a
    sharded init);
  - step time: the same executable called on the engine's state, median over N steps after
    one warm-up step, each timed to `block_until_ready` including the batch transfer.
Step times are CPU-simulated: the 8 "devices" share the host's cores and collectives are
memory copies, so they rank layouts only loosely and say nothing about GPU speed.
"""
from __future__ import annotations

import sys


from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)
import _machine  # noqa: E402


DEVICES = 8
set_device_count(DEVICES)

import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import zerojax  # noqa: E402
from zerojax.models import Llama, LlamaConfig  # noqa: E402

MiB, KiB = 2 ** 20, 2 ** 10
ROWS, SEQ = 16, 128
CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ)
SIZES = (1, 2, 4, 8)
STAGES = (0, 1, 2, 3) if "--all-stages" in sys.argv else (0, 3)
TIME_STAGES = (0, 3)                   # stages 1 and 2 are compiled and run once, not timed
STEPS = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 5
LOSS_TOL = 1e-4

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
         "collective-permute": "CP"}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16}


def layouts():
    """(data, sequence, tensor, strategy, stage) for every valid layout; DP stage 0 first."""
    out = []
    for t in SIZES:
        for s in SIZES:
            if DEVICES % (t * s):
                continue
            d = DEVICES // (t * s)
            if ROWS % d or SEQ % s or CFG.num_attention_heads % t:
                continue
            for strategy in (("ulysses", "ring") if s > 1 else ("-",)):
                for stage in STAGES:
                    out.append((d, s, t, strategy, stage))
    return out


def config(d, s, t, strategy, stage):
    return {
        "train_batch_size": ROWS,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "tensor_parallel": {"autotp_size": t},
        "sequence_parallel_size": s,
        "zerojax": {"sequence_parallel": {"strategy": "ulysses" if strategy == "-" else strategy}},
    }


# ---- HLO collective bytes -------------------------------------------------------------
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start|-done)?\(")
_CALLEE = re.compile(r"\b(?:body|calls|to_apply|branch_computations|true_computation|false_computation)"
                     r"=\{?([%\w.\-, ]+)\}?")
_TRIPS = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(text: str) -> int:
    """Bytes of an HLO result type: one array `f32[8,64]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        total += DTYPE_BYTES[dtype] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
    return total


def collective_bytes(hlo: str) -> dict:
    """Per kind: bytes counted once per op; plus `total_trips` with loop bodies x trip count."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.startswith((" ", "\t")):
            computations[current].append(line)

    # How many times each computation runs per step: ENTRY once, a while body `trip` times its
    # caller's count; other callees (async wrappers, calls, conditionals) as often as the caller.
    runs = {entry: 1}
    unknown_trips = False
    work = [entry]
    while work:
        name = work.pop()
        for line in computations.get(name, ()):
            for group in _CALLEE.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if callee not in computations:
                        continue
                    times = runs[name]
                    if " while(" in line and f"body=%{callee}" in line:
                        m = _TRIPS.search(line)
                        unknown_trips |= m is None
                        times *= int(m.group(1)) if m else 1
                    if runs.get(callee, 0) < times:
                        runs[callee] = times
                        work.append(callee)

    once = dict.fromkeys(KINDS, 0)
    in_loops = 0
    total_trips = 0
    for name, lines in computations.items():
        for line in lines:
            m = _OP.search(line)
            if not m or m.group(3) == "-start":          # async: counted at the -done op
                continue
            size = shape_bytes(m.group(1))
            once[m.group(2)] += size
            total_trips += size * runs.get(name, 1)
            in_loops += size if runs.get(name, 1) > 1 else 0
    return {**once, "total": sum(once.values()), "in_loops": in_loops, "total_trips": total_trips,
            "unknown_trips": unknown_trips}


# ---- layouts ----------------------------------------------------------------------------
def build(layout, batch):
    """An abstract engine (shapes and shardings only) and its train step, lowered."""
    engine = zerojax.initialize(model_fn=lambda rngs: Llama(CFG, rngs=rngs), config=config(*layout),
                                example_batch=batch, abstract=True)
    d, s, t, _, _ = layout
    assert (engine.mesh.shape["data"], engine.mesh.shape["sequence"], engine.mesh.shape["tensor"]) == (d, s, t)
    return engine, engine.lower_train_step(batch)


def measure(engine, compiled, host_state, batch, timed: bool) -> dict:
    analysis = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    state = jax.device_put(host_state, engine.state_shardings)

    def step():
        nonlocal state
        state, metrics = compiled(state, engine.shard_batch(batch, rows=ROWS))
        return jax.block_until_ready(metrics)

    loss = float(step()["loss"])              # first step: also the warm-up
    times = []
    if timed:
        for _ in range(STEPS):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    del state
    return {"loss": loss, "ms": 1e3 * float(np.median(times)) if times else None,
            "args": int(analysis.argument_size_in_bytes), "temp": int(analysis.temp_size_in_bytes),
            **coll}


def main() -> int:
    batch = {"input_ids": np.random.default_rng(0).integers(0, CFG.vocab_size, (ROWS, SEQ), dtype=np.int32)}
    todo = layouts()
    print(_machine.describe())
    print(f"{len(todo)} layouts of Llama (vocab {CFG.vocab_size}, hidden {CFG.hidden_size}, intermediate "
          f"{CFG.intermediate_size}, {CFG.num_hidden_layers} layers, {CFG.num_attention_heads} heads / "
          f"{CFG.num_key_value_heads} K/V), fp32 AdamW, batch {ROWS} x {SEQ} tokens, {DEVICES} simulated "
          f"CPU devices;\nstep ms = CPU-simulated median of {STEPS} steps after 1 warm-up (relative only; "
          f"ZeRO {', '.join(map(str, TIME_STAGES))} only)")
    head = (f"{'d':>2} {'s':>2} {'t':>2} {'seq-par':>7} {'zero':>4} | {'ms':>6} | {'args MiB':>8} {'temp MiB':>8} | "
            + " ".join(f"{SHORT[k]:>7}" for k in KINDS)
            + f" {'total':>7} | {'x trips':>7} | {'loss Δ':>7}")
    print("collectives: KiB per device per step (result shapes); per-kind and `total` count each op once, "
          "`x trips` multiplies\nops in while-loop bodies (the scanned layers) by the loop's trip count")
    t_start = time.perf_counter()
    # The reference: data parallelism at ZeRO-0 through the public API. Every layout starts from
    # its initial state (put onto the layout's shardings), so the losses compare the step's math.
    reference = zerojax.initialize(model_fn=lambda rngs: Llama(CFG, rngs=rngs),
                                   config=config(DEVICES, 1, 1, "-", 0), example_batch=batch)
    host_state = jax.device_get(reference.state)
    ref = float(reference.train_step(batch)["loss"])
    del reference

    print(head)
    print("-" * len(head))
    worst, failed = 0.0, 0
    for layout in todo:
        d, s, t, strategy, stage = layout
        prefix = f"{d:>2} {s:>2} {t:>2} {strategy:>7} {stage:>4} |"
        try:
            engine, lowered = build(layout, batch)
            r = measure(engine, lowered.compile(), host_state, batch, timed=stage in TIME_STAGES)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"{prefix} ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        delta = abs(r["loss"] - ref)
        worst = max(worst, delta)
        ms = f"{r['ms']:>6.1f}" if r["ms"] is not None else f"{'-':>6}"
        print(f"{prefix} {ms} | {r['args'] / MiB:>8.2f} {r['temp'] / MiB:>8.2f} | "
              + " ".join(f"{r[k] / KiB:>7.0f}" for k in KINDS)
              + f" {r['total'] / KiB:>7.0f} | {r['total_trips'] / KiB:>7.0f}"
              + ("?" if r["unknown_trips"] else "") + f" | {delta:>7.1e}", flush=True)
    print("d/s/t = data/sequence/tensor mesh sizes; args, temp = compiler per-device bytes "
          "(engine.memory_report()'s arguments, temp);\nAR AG RS A2A CP = all-reduce, all-gather, "
          "reduce-scatter, all-to-all, collective-permute; ? = a loop without known_trip_count "
          "(counted once)")
    print(f"reference loss (d=8, ZeRO-0, first step) {ref:.6f}; max |Δ| over all layouts {worst:.2e} "
          f"(tolerance {LOSS_TOL:g}); {failed} layouts failed; {time.perf_counter() - t_start:.0f} s")
    return 1 if failed or worst > LOSS_TOL else 0


if __name__ == "__main__":
    sys.exit(main())
