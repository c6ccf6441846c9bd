"""How long `zerojax plan` takes, and how much host memory, for a 70B and a 1T Llama.

    python3 benchmarks/plan_time.py              # both sizes, full plans (compiled) and --no-compile
    python3 benchmarks/plan_time.py --only 70b   # one size

Each plan runs as `zerojax plan CONFIG --devices N --json` in its own process (the device
count is fixed when jax starts), timed from the launch to the JSON; its peak RSS comes
from `wait4`. Nothing is allocated for the model: the train step is compiled ahead of time
from ShapeDtypeStructs, one program per ZeRO stage x remat (8) plus one per remat at the
largest micro-batch (2). Goals (issue 17): 70B on 256 devices within 60 s on 2 cores, 1T
within 3 minutes, neither running out of this machine's memory.

Models (bf16 compute, fp32 master params, AdamW, sequence 4096, vocab 32000):
  70B: hidden 8192, 80 layers, 64 heads / 8 KV heads, intermediate 28672; 256 devices,
       train_batch_size 1024 (micro-batch 1, 2 or 4 per device)
  1T:  hidden 25600, 128 layers, 160 heads / 8 KV heads, intermediate 86016; 1024 devices,
       train_batch_size 2048 (micro-batch 1 or 2)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from _machine import describe  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = {"type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096}
SIZES = {
    "70b": (dict(LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8), 256, 1024, 60),
    "1t": (dict(LLAMA, hidden_size=25600, intermediate_size=86016, num_hidden_layers=128,
                num_attention_heads=160, num_key_value_heads=8), 1024, 2048, 180),
}


def run_plan(path: str, devices: int, compile: bool) -> dict:
    argv = [sys.executable, "-m", "zerojax.cli", "plan", path, "--devices", str(devices), "--json"]
    if not compile:
        argv.append("--no-compile")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # full optimisation, as a user runs it
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}",
                "seconds": seconds, "rss_gib": usage.ru_maxrss / 2**20}
    return {"result": json.loads(stdout), "seconds": seconds, "rss_gib": usage.ru_maxrss / 2**20,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    print(describe())
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (other work on the "
          f"machine inflates wall time; cpu s is this plan's own)")
    print(f"{'model':>5} {'params':>8} {'devices':>7} {'mode':>10} {'programs':>8} {'candidates':>10} "
          f"{'wall s':>7} {'cpu s':>7} {'peak RSS GiB':>12} {'goal s':>6}  best candidate")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, devices, batch, goal) in SIZES.items():
            if only and name != only:
                continue
            path = os.path.join(tmp, f"{name}.json")
            with open(path, "w") as f:
                json.dump({"train_batch_size": batch, "bf16": {"enabled": True},
                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                           "zero_optimization": {"stage": 3},
                           "zerojax": {"model": model, "data": {"seq_len": 4096}}}, f)
            for compile in (False, True):
                run = run_plan(path, devices, compile)
                mode = "compiled" if compile else "no-compile"
                if "error" in run:
                    print(f"{name:>5} {'-':>8} {devices:>7} {mode:>10} {'-':>8} {'-':>10} {run['seconds']:>7.1f} "
                          f"{'-':>7} {run['rss_gib']:>12.2f} {goal:>6}  {run['error']}")
                    continue
                result = run["result"]
                best = result["candidates"][0]
                summary = (f"stage {best['stage']} remat {best['remat'] or '-'} micro {best['micro_batch']} "
                           f"offload {best['offload']}: {best['total_bytes'] / 2**30:.1f} GiB"
                           + (f", {best['step_seconds']:.2f} s/step" if best["step_seconds"] else "")
                           + ("" if best["fits"] else " (nothing fits)"))
                print(f"{name:>5} {result['params'] / 1e9:>7.1f}B {devices:>7} {mode:>10} "
                      f"{result['programs_compiled']:>8} {len(result['candidates']):>10} {run['seconds']:>7.1f} "
                      f"{run['cpu_seconds']:>7.1f} {run['rss_gib']:>12.2f} {goal:>6}  {summary}")


if __name__ == "__main__":
    main()
