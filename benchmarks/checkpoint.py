"""Checkpoint save, restore and export: seconds, MB/s and peak extra host RSS.

    python3 benchmarks/checkpoint.py               # 3 repeats of every operation (default)
    python3 benchmarks/checkpoint.py --repeats 5   # more repeats, tighter medians
    python3 benchmarks/checkpoint.py --dir /some/disk   # where the checkpoints go (default: a temp dir)
    python3 benchmarks/checkpoint.py --verbose     # also every repeat's seconds and RSS

Model: the reference Llama (vocab 8192, hidden 512, intermediate 1536, 6 layers, 8 heads;
~29M params, fp32) with AdamW, ZeRO-3 on 8 simulated CPU devices: ~115 MB of params and
~230 MB of Adam moments. The moments are filled with random values first (fresh ones are
all zeros and would make the files unrealistically easy to write and read).

Operations, run round-robin (one of each per repeat, the two saves swapping order every
repeat) so machine noise hits all alike:
  sync save       `engine.save_checkpoint(dir, tag, async_save=False)`: returns when the
                  checkpoint is complete and `latest` names it
  async save      `save_checkpoint(..., async_save=True)`: "returns" is the time until the call
                  returns (training can go on); "complete" is the time from the call until
                  `engine.wait_for_checkpoint()` returns
  restore         `load_checkpoint` onto the engine that saved it (ZeRO-3, 8 devices)
  restore other   `load_checkpoint` onto a second engine: ZeRO-1 over the first 4 devices
                  (`"zerojax": {"mesh": {"data": 4}}`), so every array is resharded
  params only     `load_checkpoint(..., load_module_only=True)` on the ZeRO-3 engine
  export fp32     `zerojax.checkpoint.export_safetensors(dir, out, tag=..., dtype="float32")`,
                  the streamed zero_to_fp32 equivalent
Every restore is timed to `block_until_ready` of the engine's state.

Columns: size MB (10^6 bytes) is the bytes the operation moves: the checkpoint's bytes on
disk for saves and full restores, the params' bytes for a params-only restore, the output
file for the export. MB/s = size / median seconds. Peak extra RSS is the process's resident
memory high-water mark during the operation minus its RSS just before it (after
`gc.collect()` and `malloc_trim`), the largest over the repeats; it is the larger of a
sampling thread (psutil, every 2 ms) and, where Linux allows resetting it, the kernel's
exact VmHWM. The simulated devices are host memory, so a restore's new state (the old one
is freed only after it is complete) shows up in RSS.

On CPU devices orbax's device-to-host transfer is a zero-copy numpy view, so "async save:
returns" is only bookkeeping here; on GPUs or TPUs it includes copying this process's
shards to host memory.

The files were just written, so restores and the export read from the page cache: this
measures zerojax and orbax, not the disk. Orbax does not fsync the array files, so saves
measure writing into the page cache too.
"""
from __future__ import annotations

import os
import sys


from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)
import _machine  # noqa: E402


DEVICES = 8
set_device_count(DEVICES)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

import zerojax  # noqa: E402
from zerojax import checkpoint as ckpt  # noqa: E402
from zerojax.models import Llama, LlamaConfig  # noqa: E402

MB = 1e6
CFG = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, max_position_embeddings=256)
SEQ = 64


# ---- peak RSS -----------------------------------------------------------------------------------

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def _trim() -> None:
    """Hand freed heap back to the OS so the baseline is what is really in use."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.extra`: high-water RSS minus RSS at entry, bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.proc = psutil.Process()
        self.extra = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        _trim()
        self.base = self.peak = self.proc.memory_info().rss
        self.exact = _reset_hwm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        hwm = _read_hwm() if self.exact else None
        self.sampled_extra = self.peak - self.base
        self.extra = max(self.peak, hwm or 0) - self.base
        return False


# ---- setup ----------------------------------------------------------------------------------------

def engine_config(stage: int, rows: int, mesh: dict | None = None) -> dict:
    config = {"train_batch_size": rows,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    if mesh:
        config["zerojax"] = {"mesh": mesh}
    return config


def make_engine(stage: int, devices: int):
    mesh = {"data": devices} if devices != DEVICES else None
    return zerojax.initialize(
        model_fn=lambda rngs: Llama(CFG, rngs=rngs), config=engine_config(stage, devices, mesh),
        example_batch={"input_ids": np.zeros((devices, SEQ), np.int32)})


def randomise_optimizer(engine) -> None:
    """Adam moments as after some training: random floats in place of zeros, same shardings."""
    def fill(opt_state):
        leaves, treedef = jax.tree.flatten(opt_state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        out = [jax.random.normal(k, x.shape, x.dtype) * 1e-3
               if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x
               for k, x in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, out)
    opt_state = jax.jit(fill, out_shardings=engine.state_shardings.opt_state)(engine.state.opt_state)
    engine.state = engine.state._replace(opt_state=jax.block_until_ready(opt_state))


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bytes_on_disk(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


# ---- the run --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="parent directory for the checkpoints (default: temp)")
    parser.add_argument("--verbose", action="store_true", help="also print every repeat's numbers")
    args = parser.parse_args()

    t_setup = time.perf_counter()
    engine = make_engine(stage=3, devices=DEVICES)
    randomise_optimizer(engine)
    other = make_engine(stage=1, devices=4)
    params_bytes = tree_bytes(engine.state.params)
    opt_bytes = tree_bytes(engine.state.opt_state)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(engine.state.params))
    largest = max(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(engine.state.params))
    setup_s = time.perf_counter() - t_setup
    has_export = importlib.util.find_spec("zerojax.safetensors_io") is not None

    times: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    exact_hwm = True

    def record(name: str, seconds: float, meter: PeakRSS, size: int) -> None:
        nonlocal exact_hwm
        times.setdefault(name, []).append(seconds)
        rss.setdefault(name, []).append(meter.extra)
        sizes[name] = size
        exact_hwm &= meter.exact
        if args.verbose:
            print(f"  rep {rep}: {name:<32} {seconds:8.3f} s  extra RSS {meter.extra / MB:7.1f} MB "
                  f"(sampler {meter.sampled_extra / MB:7.1f} MB)", flush=True)

    def restore(target, root, tag, **kw) -> float:
        t0 = time.perf_counter()
        target.load_checkpoint(root, tag, **kw)
        jax.block_until_ready(target.state)
        return time.perf_counter() - t0

    root = tempfile.mkdtemp(prefix="zerojax-ckpt-bench-", dir=args.dir)
    try:
        for rep in range(args.repeats):
            sync_tag, async_tag = f"sync{rep}", f"async{rep}"

            def sync_save():
                with PeakRSS() as m:
                    t0 = time.perf_counter()
                    engine.save_checkpoint(root, sync_tag, async_save=False)
                    seconds = time.perf_counter() - t0
                record("sync save", seconds, m, bytes_on_disk(os.path.join(root, sync_tag)))

            def async_save():
                with PeakRSS() as m_all:
                    with PeakRSS() as m:
                        t0 = time.perf_counter()
                        engine.save_checkpoint(root, async_tag, async_save=True)
                        returned = time.perf_counter() - t0
                    engine.wait_for_checkpoint()
                    complete = time.perf_counter() - t0
                size = bytes_on_disk(os.path.join(root, async_tag))
                record("async save: returns", returned, m, size)
                record("async save: complete", complete, m_all, size)
                shutil.rmtree(os.path.join(root, async_tag))

            # The two saves swap places every repeat: the second one writes while the
            # kernel is still flushing the first.
            for save in (sync_save, async_save) if rep % 2 == 0 else (async_save, sync_save):
                save()
            ckpt_bytes = sizes["sync save"]

            with PeakRSS() as m:
                seconds = restore(engine, root, sync_tag)
            record("restore, same layout (Z3 x8)", seconds, m, ckpt_bytes)

            with PeakRSS() as m:
                seconds = restore(other, root, sync_tag)
            record("restore, other layout (Z1 x4)", seconds, m, ckpt_bytes)

            with PeakRSS() as m:
                seconds = restore(engine, root, sync_tag, load_module_only=True)
            record("restore, params only (Z3 x8)", seconds, m, params_bytes)

            if not has_export:
                has_export = importlib.util.find_spec("zerojax.safetensors_io") is not None
            if has_export:
                out = os.path.join(root, "model.safetensors")
                with PeakRSS() as m:
                    t0 = time.perf_counter()
                    ckpt.export_safetensors(root, out, tag=sync_tag, dtype="float32")
                    seconds = time.perf_counter() - t0
                record("export safetensors fp32", seconds, m, os.path.getsize(out))
                os.remove(out)
            shutil.rmtree(os.path.join(root, sync_tag))
    finally:
        engine.wait_for_checkpoint()
        shutil.rmtree(root, ignore_errors=True)

    print(_machine.describe())
    print(f"Llama {n_params:,} params (vocab {CFG.vocab_size}, hidden {CFG.hidden_size}, intermediate "
          f"{CFG.intermediate_size}, {CFG.num_hidden_layers} layers), fp32 + AdamW, ZeRO-3 on {DEVICES} "
          f"simulated CPU devices; params {params_bytes / MB:.1f} MB + optimizer {opt_bytes / MB:.1f} MB; "
          f"largest tensor {largest / MB:.1f} MB; {args.repeats} repeats, round-robin; setup {setup_s:.1f} s")
    head = f"{'operation':<32} {'size MB':>8} {'median s':>9} {'MB/s':>8} {'peak extra RSS MB':>18}"
    print(head)
    print("-" * len(head))
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<32} {sizes[name] / MB:>8.1f} {med:>9.3f} {sizes[name] / MB / med:>8.0f} "
              f"{max(rss[name]) / MB:>18.1f}")
    if not has_export:
        print(f"{'export safetensors fp32':<32} skipped: zerojax.safetensors_io is not available")
    print(f"size MB: bytes moved (checkpoint on disk; params for params-only; output file for export). "
          f"MB/s = size / median s.\npeak extra RSS: high-water RSS during the operation minus RSS before "
          f"it, largest over the repeats ({'kernel VmHWM and a 2 ms sampler' if exact_hwm else '2 ms sampler'}); "
          f"goal for the export: near the largest tensor ({largest / MB:.1f} MB).\n"
          f"Restores and the export read files just written (page cache), and saves are not fsynced.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
