"""The main job, end to end: `zerojax train configs/tiny.json` as a user runs it.

    python3 benchmarks/train_tiny.py                 # 3 runs x 60 steps, ZeRO-3 and ZeRO-0
    python3 benchmarks/train_tiny.py --repeats 5     # tighter medians
    python3 benchmarks/train_tiny.py --steps 100     # longer runs
    python3 benchmarks/train_tiny.py --no-stage0     # only the main job

Each run is a fresh process (`python -m zerojax.cli train configs/tiny.json --steps N
--out TMP`) into its own temp dir, so every run pays import, data loading and compilation.
Device count: the command's own default (one simulated CPU device per core, up to 8) on a
CPU-only host; this script drops any device count from XLA_FLAGS so the job runs as a user
would run it. The peer row adds `--set zero_optimization.stage=0`; runs alternate (ZeRO-3,
ZeRO-0, ZeRO-3, ...) so machine noise hits both alike.

Per run, from DIR/metrics.jsonl and the process:
  tokens/s      median over steps 2..N of the logged tokens_per_s (rows x seq_len / step time)
  ms/step       median step time over steps 2..N
  first step s  the first step's own time (compilation of the train step + one step)
  to first s    process start -> first line of metrics.jsonl (imports, corpus, engine, compile)
  wall s        process start -> exit (includes the final checkpoint and the loss-curve PNG)
  peak RSS MB   the process's resident-memory high-water mark (ru_maxrss from wait4)
The table gives the median of each over the runs, and the ZeRO-0 / ZeRO-3 ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _machine  # benchmarks/ is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny.json")


def run_once(steps: int, extra: list[str], timeout: float) -> dict:
    out = tempfile.mkdtemp(prefix="zerojax-train-tiny-")
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "zerojax.cli", "train", CONFIG, "--steps", str(steps), "--out", out, *extra]
    jsonl = os.path.join(out, "metrics.jsonl")
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first_line = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter()
            if first_line is None and os.path.exists(jsonl) and os.path.getsize(jsonl) > 0:
                first_line = now
            if pid:
                break
            if now - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd)} ran past {timeout:.0f} s")
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
        with open(jsonl) as f:
            records = [r for r in map(json.loads, filter(str.strip, f)) if "tokens_per_s" in r]
        later = records[1:]
        return {"tokens/s": statistics.median(r["tokens_per_s"] for r in later),
                "ms/step": 1e3 * statistics.median(r["step_time_s"] for r in later),
                "first step s": records[0]["step_time_s"],
                "to first s": (first_line or wall) - t0,
                "wall s": wall,
                "peak RSS MB": usage.ru_maxrss / 1024,          # KiB on Linux
                "loss": (records[0]["loss"], records[-1]["loss"])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-stage0", action="store_true", help="skip the ZeRO-0 peer row")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first step is compilation)")

    rows = {"ZeRO-3 (tiny.json)": []}
    extras = {"ZeRO-3 (tiny.json)": []}
    if not args.no_stage0:
        rows["ZeRO-0 (--set stage=0)"], extras["ZeRO-0 (--set stage=0)"] = [], ["--set", "zero_optimization.stage=0"]
    for i in range(args.repeats):
        for name in rows:
            r = run_once(args.steps, extras[name], args.timeout)
            rows[name].append(r)
            print(f"  run {i + 1}/{args.repeats} {name}: {r['tokens/s']:,.0f} tokens/s, first step "
                  f"{r['first step s']:.1f} s, loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}", file=sys.stderr)

    cols = ["tokens/s", "ms/step", "first step s", "to first s", "wall s", "peak RSS MB"]
    med = {name: {c: statistics.median(r[c] for r in runs) for c in cols} for name, runs in rows.items()}
    width = max(map(len, med)) + 2
    print(_machine.describe())
    print(f"zerojax train configs/tiny.json --steps {args.steps}: medians of {args.repeats} runs "
          f"(fresh process each; step 1 excluded from tokens/s and ms/step)")
    print("".ljust(width) + "".join(c.rjust(13) for c in cols))
    for name, m in med.items():
        print(name.ljust(width) + "".join((f"{m[c]:,.0f}" if c == "tokens/s" else f"{m[c]:.1f}").rjust(13)
                                          for c in cols))
    if len(med) == 2:
        a, b = med.values()
        print("ratio 0/3".ljust(width) + "".join(f"{b[c] / a[c]:.2f}".rjust(13) for c in cols))


if __name__ == "__main__":
    main()
