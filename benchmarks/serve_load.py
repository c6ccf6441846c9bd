"""Serving under load: `zerojax serve` vs HF `transformers` behind a one-at-a-time server.

    python3 benchmarks/serve_load.py              # every scenario (~8 minutes on 2 cores)
    python3 benchmarks/serve_load.py --quick      # fewer requests and a shorter time bound

vLLM's `benchmark_serving` method, on loopback: each scenario sends a fixed, seeded list of
streaming `/v1/completions` requests (token-id prompts, greedy, every request generates
exactly its `max_tokens`: the model has no EOS), arrivals Poisson at `rate` requests/s
(`inf`: all at once) under a cap of `concurrency` requests in flight. A scenario is bounded
in count and in time: what has not finished at `--time-limit` seconds is cancelled and
counted as not done.

Both servers run the same weights (the ~1M-param Llama of `_hf_llama`, fp32), one after
the other, as processes of their own on the same cores; the client here is shared:
  zerojax  `zerojax serve DIR` (continuous batching over the paged KV engine)
  naive    `peers/naive_hf_server.py DIR`: `model.generate` per request, one at a time

Per scenario and server: requests done, request/s, output tokens/s, TTFT / TPOT / ITL (mean,
p50, p99 over done requests; ITL is the gap between chunks that carry tokens) and goodput,
MII's effective throughput: requests/s that finished within the SLO (TTFT <= --slo-ttft and
TPOT <= --slo-tpot). The goal row: 32 concurrent clients sending 128-token prompts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

import _machine
from _hf_llama import VOCAB, hf_model, mixed_requests, param_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 2
SLO = {"ttft": 1.0, "tpot": 0.1}      # seconds; --slo-ttft / --slo-tpot


@dataclass
class Scenario:
    name: str
    requests: list            # (prompt ids, max_tokens)
    rate: float               # requests/s, inf: all at once
    concurrency: int


@dataclass
class Record:
    sent: float
    stamps: list = field(default_factory=list)   # (time, tokens in the chunk)
    done: bool = False

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.stamps)


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback, up once `/health` answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600.0) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def zerojax_server(model_dir: str, port: int) -> Server:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return Server("zerojax", [sys.executable, "-m", "zerojax.cli", "serve", model_dir, "--port", str(port),
                              "--max-queue", "1024", "--served-model-name", "tiny"], port, env)


def naive_server(model_dir: str, port: int) -> Server:
    return Server("naive HF", [sys.executable, os.path.join(HERE, "peers", "naive_hf_server.py"), model_dir,
                               "--port", str(port), "--threads", str(THREADS)], port)


# ---------------------------------------------------------------- the load client
async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], new: int, record: Record) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": new, "temperature": 0.0, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            choices = json.loads(line[6:])["choices"]
            tokens = sum(len(c.get("token_ids") or []) for c in choices)
            if tokens:
                record.stamps.append((time.perf_counter(), tokens))
    record.done = record.tokens == new


async def run_scenario(url: str, scenario: Scenario, time_limit: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    gaps = (np.zeros(len(scenario.requests)) if math.isinf(scenario.rate)
            else rng.exponential(1.0 / scenario.rate, len(scenario.requests)))
    arrivals = np.cumsum(gaps)
    cap = asyncio.Semaphore(scenario.concurrency)
    records: list[Record] = []
    limits = httpx.Limits(max_connections=scenario.concurrency + 4, max_keepalive_connections=scenario.concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()

        async def arrive(at: float, prompt, new):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with cap:
                record = Record(sent=time.perf_counter())
                records.append(record)
                await one_request(client, url, prompt, new, record)

        tasks = [asyncio.create_task(arrive(at, p, n)) for at, (p, n) in zip(arrivals, scenario.requests)]
        finished, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in finished:
            task.result()                       # a failed request fails the benchmark, loudly
        end = max([r.stamps[-1][0] for r in records if r.stamps] + [start]) if not pending else start + time_limit
    return summarize(records, end - start, len(scenario.requests))


def summarize(records: list[Record], duration: float, total: int) -> dict:
    done = [r for r in records if r.done]
    ttft = [r.stamps[0][0] - r.sent for r in done]
    tpot = [(r.stamps[-1][0] - r.stamps[0][0]) / max(1, r.tokens - 1) for r in done]
    itl = [b[0] - a[0] for r in done for a, b in zip(r.stamps, r.stamps[1:])]
    good = sum(1 for f, p in zip(ttft, tpot) if f <= SLO["ttft"] and p <= SLO["tpot"])
    return {"done": len(done), "total": total, "duration": duration, "tokens": sum(r.tokens for r in records),
            "ttft": ttft, "tpot": tpot, "itl": itl, "good": good}


# ---------------------------------------------------------------- table
def stats_ms(values: list[float]) -> str:
    if not values:
        return "-"
    v = np.asarray(values) * 1e3
    return f"{v.mean():.0f}/{np.percentile(v, 50):.0f}/{np.percentile(v, 99):.0f}"


def row(scenario: Scenario, who: str, r: dict, peer: dict | None) -> tuple:
    rate = r["tokens"] / r["duration"]
    ratio = f"{rate / (peer['tokens'] / peer['duration']):.2f}x" if peer else ""
    rate_name = "inf" if math.isinf(scenario.rate) else f"{scenario.rate:g}"
    return (scenario.name, rate_name, str(scenario.concurrency), who, f"{r['done']}/{r['total']}",
            f"{r['done'] / r['duration']:.2f}", f"{rate:,.0f}", ratio, stats_ms(r["ttft"]), stats_ms(r["tpot"]),
            stats_ms(r["itl"]), f"{r['good'] / r['duration']:.2f}")


def print_table(header: list[str], rows: list[tuple]) -> None:
    head = ("scenario", "rate/s", "conc", "server", "done", "req/s", "out tok/s", "vs naive",
            "TTFT ms mean/p50/p99", "TPOT ms", "ITL ms", "goodput req/s")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print()
    for line in header:
        print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------- main
def scenarios(quick: bool) -> list[Scenario]:
    rng = np.random.default_rng(1)
    count = 32 if quick else 64
    goal = [(rng.integers(1, VOCAB, 128).tolist(), 128) for _ in range(count)]
    mixed = mixed_requests(count, seed=2)
    out = [Scenario("goal 128-token prompts", goal, math.inf, 32)]
    for rate in ((8.0, math.inf) if quick else (2.0, 8.0, math.inf)):
        out.append(Scenario("mixed 16-256", mixed, rate, 32))
    return out


def warm(url: str) -> None:
    """Two requests before timing: the naive server's first generate pays torch's warm-up."""
    asyncio.run(run_scenario(url, Scenario("warm", [([1, 2, 3], 4)] * 2, math.inf, 2), time_limit=120))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 requests per scenario, 2 rates, 30 s bound")
    parser.add_argument("--time-limit", type=float, help="seconds per scenario (default 60, --quick 30)")
    parser.add_argument("--slo-ttft", type=float, default=SLO["ttft"], help="seconds (default 1.0)")
    parser.add_argument("--slo-tpot", type=float, default=SLO["tpot"], help="seconds per token (default 0.1)")
    parser.add_argument("--only", default="zerojax,naive", help="servers to run")
    args = parser.parse_args()
    # A SIGTERM runs the `finally`s below, so no server process outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    SLO.update(ttft=args.slo_ttft, tpot=args.slo_tpot)
    time_limit = args.time_limit or (30.0 if args.quick else 60.0)
    header = [_machine.describe(),
              f"~1M-param Llama, fp32, greedy, token-id prompts on loopback; each scenario bounded at "
              f"{time_limit:.0f} s; SLO TTFT <= {SLO['ttft']:g} s, TPOT <= {SLO['tpot'] * 1e3:.0f} ms"]
    print(header[0], flush=True)
    plan = scenarios(args.quick)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model("tiny", f"{tmp}/tiny")
        header[1] = header[1].replace("~1M", f"{param_bytes(model) / 4 / 1e6:.2f}M")
        del model
        starters = {"zerojax": zerojax_server, "naive": naive_server}
        for who in args.only.split(","):
            server = starters[who](f"{tmp}/tiny", free_port())
            try:
                ready = server.wait_ready()
                print(f"{server.name}: ready in {ready:.1f} s", flush=True)
                warm(server.url)
                results[who] = []
                for scenario in plan:
                    r = asyncio.run(run_scenario(server.url, scenario, time_limit))
                    results[who].append(r)
                    print(f"  {scenario.name} rate {scenario.rate:g}: {r['done']}/{r['total']} done, "
                          f"{r['tokens'] / r['duration']:,.0f} out tok/s", flush=True)
            finally:
                server.stop()
    rows = []
    for i, scenario in enumerate(plan):
        peer = results["naive"][i] if "naive" in results else None
        for who in results:
            rows.append(row(scenario, who, results[who][i], peer if who != "naive" else None))
    print_table(header, rows)
    if "zerojax" in results and "naive" in results:
        z, n = results["zerojax"][0], results["naive"][0]
        ratio = (z["tokens"] / z["duration"]) / (n["tokens"] / n["duration"])
        p99 = float(np.percentile(z["ttft"], 99)) if z["ttft"] else float("nan")
        print(f"\ngoal: 32 concurrent clients >= 5x the naive server's output tokens/s: {ratio:.2f}x; "
              f"p99 TTFT {p99 * 1e3:.0f} ms (goal < 1000 ms) for 128-token prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
