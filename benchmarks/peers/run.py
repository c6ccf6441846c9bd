"""Side-by-side CPU benchmark: zerojax vs PyTorch (plain, DDP, FSDP2) vs DeepSpeed ZeRO 0-3.

    python3 benchmarks/peers/run.py                       # 2 rounds x 23 steps; ~12 minutes on 2 cores
    python3 benchmarks/peers/run.py --rounds 3 --steps 30 # tighter medians
    python3 benchmarks/peers/run.py --only plain,ds3,zerojax3

Writes the shared weights (.npz, numpy, seed 0) and data (byte windows of the Python
standard library) into a temp work folder, then runs every system as fresh processes,
round-robin (the order reverses every round) so machine noise hits all alike. Prints one
table; see benchmarks/README.md for the columns. Exits 1 if a run fails or a loss differs
from plain PyTorch's by more than --tol at any step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))   # benchmarks/_machine.py

import _machine  # noqa: E402
from zerojax import host_memory  # noqa: E402

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ZJ_LAUNCH = [PY, "-m", "zerojax.cli", "launch", "--nproc", "2", "--"]
TWO_DEVICES = "--xla_force_host_platform_device_count=2"

# name -> (label, procs, argv builder, extra env)
SYSTEMS = {
    "plain": ("PyTorch plain", 1, lambda a: [PY, "torch_runner.py", "--mode", "plain", *a], {}),
    "ddp": ("PyTorch DDP", 2, lambda a: [*TORCHRUN, "torch_runner.py", "--mode", "ddp", *a], {}),
    "fsdp2": ("PyTorch FSDP2", 2, lambda a: [*TORCHRUN, "torch_runner.py", "--mode", "fsdp2", *a], {}),
    **{f"ds{s}": (f"DeepSpeed ZeRO-{s}", 2,
                  (lambda s: lambda a: [*TORCHRUN, "torch_runner.py", "--mode", f"ds{s}", *a])(s),
                  {"DS_ACCELERATOR": "cpu"}) for s in range(4)},
    "ds3-cpuadam": ("DeepSpeed ZeRO-3 + CPU Adam", 2,
                    lambda a: [*TORCHRUN, "torch_runner.py", "--mode", "ds3", "--cpu-adam", *a],
                    {"DS_ACCELERATOR": "cpu"}),
    **{f"zerojax{s}": (f"zerojax ZeRO-{s} (1 proc x 2 dev)", 1,
                       (lambda s: lambda a: [PY, "zerojax_runner.py", "--stage", str(s), *a])(s),
                       {"XLA_FLAGS": TWO_DEVICES}) for s in range(4)},
    # The same as zerojax3, its compile cache filled by an untimed run first (run_one).
    "zerojax3-cached": ("zerojax ZeRO-3 (1x2, warm compile cache)", 1,
                        lambda a: [PY, "zerojax_runner.py", "--stage", "3", "--cache", CACHE, *a],
                        {"XLA_FLAGS": TWO_DEVICES}),
    **{f"zerojax{s}-mp": (f"zerojax ZeRO-{s} (2 procs)", 2,
                          (lambda s: lambda a: [*ZJ_LAUNCH, PY, "zerojax_runner.py", "--stage", str(s), *a])(s),
                          {}) for s in range(4)},
    # The same without flat buckets and core binding: XLA's per-array collectives (the
    # default before zerojax.buckets), for the side-by-side.
    "zerojax3-mp-xla": ("zerojax ZeRO-3 (2 procs, XLA collectives)", 2,
                        lambda a: [*ZJ_LAUNCH[:-1], "--bind-cores", "off", "--", PY, "zerojax_runner.py",
                                   "--stage", "3", "--collectives", "xla", *a],
                        {}),
    "zerojax3-xla": ("zerojax ZeRO-3 (1x2, XLA collectives)", 1,
                     lambda a: [PY, "zerojax_runner.py", "--stage", "3", "--collectives", "xla", *a],
                     {"XLA_FLAGS": TWO_DEVICES}),
    # A user's own Flax GPT (user_gpt.py: nnx.Linear blocks, no zerojax calls), same weights.
    "zerojax3-user": ("zerojax ZeRO-3, user's Flax GPT (1x2)", 1,
                      lambda a: [PY, "zerojax_runner.py", "--stage", "3", "--model", "user", *a],
                      {"XLA_FLAGS": TWO_DEVICES}),
    "zerojax3-user-mp": ("zerojax ZeRO-3, user's Flax GPT (2 procs)", 2,
                         lambda a: [*ZJ_LAUNCH, PY, "zerojax_runner.py", "--stage", "3", "--model", "user", *a],
                         {}),
}
CACHE = "{work}/xla_cache"
RESULT = re.compile(r"RESULT (\{[^{}]*\})")


def run_one(name: str, work: str, steps: int, warmup: int, *,
            peers_huge_pages: bool = False) -> tuple[list[dict], float]:
    label, procs, argv, extra = SYSTEMS[name]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(work, "torch_extensions"),
               JAX_PLATFORMS="cpu", **extra)
    if "XLA_FLAGS" not in extra:
        env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                                  env.get("XLA_FLAGS", "")).strip()
    if name.startswith("zerojax") or peers_huge_pages:
        # As `zerojax train` and `zerojax launch` start their processes (zerojax.host_memory).
        env = host_memory.with_huge_pages(env)
    def command(steps: int, warmup: int) -> list[str]:
        return [a.format(work=work) for a in argv(["--work", work, "--steps", str(steps), "--warmup", str(warmup)])]

    if CACHE in argv([]) and not os.path.isdir(CACHE.format(work=work)):
        subprocess.run(command(1, 0), cwd=HERE, env=env, capture_output=True, timeout=900)
    t0 = time.perf_counter()
    proc = subprocess.run(command(steps, warmup), cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    results = [json.loads(m) for m in RESULT.findall(proc.stdout)]
    if proc.returncode != 0 or len(results) != procs:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{name}: exit {proc.returncode}, {len(results)}/{procs} results")
    return results, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=23, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated subset of: " + ",".join(SYSTEMS))
    ap.add_argument("--size", default="small", choices=["small", "large"],
                    help="small: d_model 256, 4 layers, 4 heads (3.26M params); large: 512, 8, 8 (25.4M)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: mixed precision with fp32 master weights (slow on AVX2 CPUs; keep steps few)")
    ap.add_argument("--tol", type=float, default=None,
                    help="max |loss - plain PyTorch loss| allowed (default 1e-3 in fp32, 0.2 in bf16)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--peers-huge-pages", action="store_true",
                    help="start the PyTorch/DeepSpeed peers with glibc's huge pages too (zerojax rows always are)")
    args = ap.parse_args()
    os.environ.update(PEERS_SIZE=args.size, PEERS_DTYPE=args.dtype)   # read by common.py, here and in runners
    import common
    tol = args.tol if args.tol is not None else (1e-3 if args.dtype == "fp32" else 0.2)
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in SYSTEMS:
            raise SystemExit(f"unknown system {n!r}; known: {', '.join(SYSTEMS)}")

    work = tempfile.mkdtemp(prefix="zerojax-peers-")
    common.make_weights(os.path.join(work, "weights.npz"))
    common.make_data(os.path.join(work, "data.npy"), args.steps)
    runs: dict[str, list] = {n: [] for n in names}
    try:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                results, wall = run_one(n, work, args.steps, args.warmup, peers_huge_pages=args.peers_huge_pages)
                runs[n].append(results)
                r0 = min(results, key=lambda x: x["rank"])
                print(f"round {r + 1}/{args.rounds} {n:12s} {r0['tokens_per_s']:8.0f} tok/s  "
                      f"loss {r0['final_loss']:.6f}  wall {wall:5.1f}s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = {}
    for n in names:
        rank0 = [min(res, key=lambda x: x["rank"]) for res in runs[n]]
        pooled = [t for x in rank0 for t in x["step_times"]]
        rows[n] = {
            "tok": common.TOKENS_PER_STEP / statistics.median(pooled),
            "ms": 1000 * statistics.median(pooled),
            "first": statistics.median(x["first_step_s"] for x in rank0),
            "rss": max(x["peak_rss_mib"] for res in runs[n] for x in res),
            "loss": rank0[0]["final_loss"], "losses": [x["losses"] for x in rank0],
        }
    ref = rows.get("plain")
    ds3 = rows.get("ds3")
    worst = 0.0
    print("\n" + _machine.describe())
    print(f"{args.size} GPT (d_model {common.D_MODEL}, {common.LAYERS} layers, {common.HEADS} heads), "
          f"{common.ROWS} x {common.SEQ} tokens/step, {args.dtype}, AdamW, clip {common.CLIP}; "
          f"{args.rounds} rounds x {args.steps} steps ({args.steps - args.warmup} timed per run); "
          f"medians over all timed steps of all rounds")
    hugetlb = host_memory.huge_pages_available()
    print(f"glibc huge pages (glibc.malloc.hugetlb=1): "
          + ("unavailable here" if not hugetlb else
             "zerojax rows and the peers" if args.peers_huge_pages else "zerojax rows only (as its CLI and launcher start them)")
          + "\n")
    width = max(len(SYSTEMS[n][0]) for n in names)
    head = (f"{'system':{width}s} {'procs':>5s} {'tokens/s':>9s} {'ms/step':>8s} {'first step s':>12s} "
            f"{'peak RSS MiB/proc':>17s} {'loss@' + str(args.steps):>10s} {'max|Δloss|':>10s} {'vs DS ZeRO-3':>12s}")
    print(head)
    print("-" * len(head))
    for n in names:
        row, (label, procs, _, _) = rows[n], SYSTEMS[n]
        delta = (max(abs(a - b) for ls in row["losses"] for a, b in zip(ls, ref["losses"][0]))
                 if ref else float("nan"))
        worst = max(worst, delta) if ref else worst
        ratio = f"{row['tok'] / ds3['tok']:.2f}x" if ds3 else "-"
        print(f"{label:{width}s} {procs:5d} {row['tok']:9.0f} {row['ms']:8.1f} {row['first']:12.2f} "
              f"{row['rss']:17.0f} {row['loss']:10.6f} {delta:10.2e} {ratio:>12s}")
    if ref:
        print(f"\nmax |Δloss| vs PyTorch plain over all {args.steps} steps and all runs: {worst:.2e} "
              f"(tolerance {tol:g})")
        if worst > tol:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
