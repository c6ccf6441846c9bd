"""ZeRO-Offload and ZeRO-Infinity on this machine: step time, peak RSS, device bytes.

    python3 benchmarks/offload.py                  # (a) and (b) on CPU
    python3 benchmarks/offload.py --only a         # one size, every offload mode
    python3 benchmarks/offload.py --only b --ram-cap 3GiB
    python3 benchmarks/offload.py --gpu            # (c): the GPU section of gpu_check.sh

(a) One Llama (~100M params, fp32, AdamW, ZeRO-1 on 1 device), each offload mode in its own
    process: none, cpu (optimizer state in pinned host memory), cpu+params (ZeRO-3 with
    params there too) and nvme (optimizer state in files under a temp dir, sub-groups of
    8M elements, 2 buffers). Median step time over the timed steps, the process's peak
    RSS, and the device / host bytes `memory_report()` gives. On CPU the host and device
    memories are one RAM, so "cpu" saves nothing here; "nvme" takes the state out of RAM.
(b) The largest model of a width sweep whose measured peak RSS stays under --ram-cap,
    without offload and with NVMe offload (each size in its own process; 2 steps each).
(c) --gpu: a model whose fp32 Adam state does not fit the GPU next to its params: the
    plain step's compiled device bytes, and the offloaded step's bytes and step time.

`zerojax plan` timings (70B on 256 devices, 1T) are in benchmarks/plan_time.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import describe  # noqa: E402

MiB, GiB = 2 ** 20, 2 ** 30
ROWS, SEQ = 4, 128


def llama_section(hidden: int, layers: int) -> dict:
    return {"type": "llama", "vocab_size": 256, "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": SEQ}


def config(mode: str, hidden: int, layers: int, nvme_dir: str | None) -> dict:
    zero: dict = {"stage": 3 if mode == "cpu+params" else 1, "stage3_param_persistence_threshold": 0}
    if mode in ("cpu", "cpu+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if mode == "cpu+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if mode == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_dir, "buffer_count": 2}
        zero["sub_group_size"] = 8_000_000
    return {"train_batch_size": ROWS, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": zero,
            "zerojax": {"model": llama_section(hidden, layers), "mesh": {"data": 1}}}


def worker(mode: str, hidden: int, layers: int, steps: int) -> dict:
    """One run in this process: what the parent prints (JSON on the last stdout line)."""
    import jax
    import numpy as np

    import zerojax
    from zerojax.trainer import model_fn_from_config

    with tempfile.TemporaryDirectory(prefix="zerojax-nvme-") as nvme_dir:
        cfg = config(mode, hidden, layers, nvme_dir)
        model_fn, _ = model_fn_from_config(zerojax.Config.load(cfg))
        engine = zerojax.initialize(model_fn=model_fn, config=cfg, devices=jax.devices()[:1])
        rng = np.random.default_rng(0)
        batch = lambda: {"input_ids": rng.integers(0, 256, size=(ROWS, SEQ), dtype=np.int32)}
        times = []
        for _ in range(steps):
            b = batch()
            t0 = time.perf_counter()
            jax.block_until_ready(engine.train_step(b)["loss"])
            times.append(time.perf_counter() - t0)
        report = engine.memory_report()
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(engine.state.params))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "params": params, "step_s": statistics.median(times[1:] or times),
            "peak_rss": peak, "report": report}


def spawn(mode: str, hidden: int, layers: int, steps: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, str(hidden), str(layers), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"  {mode} hidden {hidden}: failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_a(steps: int) -> None:
    hidden, layers = 1024, 8
    print(f"(a) Llama hidden {hidden}, {layers} layers, fp32 AdamW, {ROWS}x{SEQ} tokens/step, 1 device; "
          f"median of {steps - 1} steps after the first")
    print(f"{'mode':>11} {'params':>8} {'step ms':>8} {'vs none':>7} {'peak RSS MiB':>12} "
          f"{'device MiB':>10} {'host MiB':>9} {'NVMe MiB':>9}")
    base = None
    for mode in ("none", "cpu", "cpu+params", "nvme"):
        r = spawn(mode, hidden, layers, steps)
        if r is None:
            continue
        base = base or r
        rep = r["report"]
        print(f"{mode:>11} {r['params'] / 1e6:>7.1f}M {r['step_s'] * 1e3:>8.0f} "
              f"{r['step_s'] / base['step_s']:>6.2f}x {r['peak_rss'] / MiB:>12,.0f} "
              f"{rep['total'] / MiB:>10,.0f} {rep['host'] / MiB:>9,.0f} {rep.get('nvme', 0) / MiB:>9,.0f}")


def part_b(cap: int) -> None:
    widths = (768, 1024, 1280, 1536, 1792, 2048)
    layers = 8
    print(f"\n(b) largest Llama ({layers} layers, width sweep) whose peak RSS stays under "
          f"{cap / GiB:.1f} GiB, 2 steps each")
    print(f"{'hidden':>6} {'params':>8} {'none RSS MiB':>12} {'nvme RSS MiB':>12}")
    best = {"none": None, "nvme": None}
    for hidden in widths:
        row = {m: spawn(m, hidden, layers, 2) for m in ("none", "nvme")}
        params = next((r["params"] for r in row.values() if r), 0)
        cells = {m: (f"{r['peak_rss'] / MiB:,.0f}" if r else "failed") for m, r in row.items()}
        print(f"{hidden:>6} {params / 1e6:>7.0f}M {cells['none']:>12} {cells['nvme']:>12}")
        for m, r in row.items():
            if r and r["peak_rss"] <= cap:
                best[m] = r["params"]
        if all(r is None or r["peak_rss"] > cap for r in row.values()):
            break
    for m, p in best.items():
        print(f"  largest under the cap, {m:>4}: " + (f"{p / 1e6:.0f}M params" if p else "none fits"))


def part_gpu() -> None:
    """A model whose fp32 AdamW state does not fit next to its params, plain vs offloaded."""
    import jax
    import numpy as np

    import zerojax
    from zerojax.trainer import model_fn_from_config

    device = jax.devices()[0]
    memory = device.memory_stats()["bytes_limit"]
    # 16 bytes/param without offload (params, grads, two moments); 8 with the moments on the host.
    hidden, layers = 8192, 1
    while 16 * 12 * hidden * hidden * layers < 1.15 * memory:
        layers += 1
    print(f"(c) {device.device_kind}: {memory / GiB:.0f} GiB; Llama hidden {hidden}, {layers} layers, fp32")
    for mode in ("none", "cpu"):
        cfg = config(mode, hidden, layers, None)
        cfg["zerojax"]["remat"] = "full"
        model_fn, _ = model_fn_from_config(zerojax.Config.load(cfg))
        batch = {"input_ids": np.zeros((ROWS, SEQ), np.int32)}
        abstract = zerojax.initialize(model_fn=model_fn, config=cfg, devices=[device], abstract=True,
                                      example_batch=batch)
        rep = abstract.memory_report()
        fits = rep["total"] <= memory
        line = (f"  {mode:>4}: device {rep['total'] / GiB:,.1f} GiB (params {rep['params'] / GiB:,.1f}, "
                f"optimizer {rep['optimizer'] / GiB:,.1f}, temp {rep['temp'] / GiB:,.1f}), "
                f"host {rep['host'] / GiB:,.1f} GiB: {'fits' if fits else 'does not fit'}")
        if fits:
            engine = zerojax.initialize(model_fn=model_fn, config=cfg, devices=[device])
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                jax.block_until_ready(engine.train_step(batch)["loss"])
                times.append(time.perf_counter() - t0)
            line += f"; step {statistics.median(times[1:]) * 1e3:,.0f} ms"
            del engine
        print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["a", "b"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ram-cap", default="3GiB")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "HIDDEN", "LAYERS", "STEPS"))
    args = parser.parse_args()
    if args.worker:
        mode, hidden, layers, steps = args.worker
        print(json.dumps(worker(mode, int(hidden), int(layers), int(steps))))
        return 0
    print(describe())
    if args.gpu:
        part_gpu()
        return 0
    from zerojax.plan import parse_bytes
    if args.only in (None, "a"):
        part_a(args.steps)
    if args.only in (None, "b"):
        part_b(parse_bytes(args.ram_cap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
