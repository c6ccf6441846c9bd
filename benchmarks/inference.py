"""Serving speed: zerojax's inference engine vs Hugging Face `generate`, same weights, one run.

    python3 benchmarks/inference.py               # every row (~10 minutes on 2 cores)
    python3 benchmarks/inference.py --quick       # fewer repeats and requests, for a smoke run
    python3 benchmarks/inference.py --only batch1,mixed
    python3 benchmarks/inference.py --gpu --quick --only batch1,mixed   # on a GPU (gpu_check.sh)

Models (`_hf_llama`: random weights, built in `transformers` and saved as a HF directory,
which zerojax loads, so both sides run the very same fp32 weights):
  anchor  Llama d 512, 8 layers, 8 heads / 4 KV, intermediate 1536, vocab 256 (25.4M params)
  tiny    Llama d 128, 5 layers, 4 heads / 2 KV, intermediate 384, vocab 256 (~1M params)

Rows (greedy everywhere; no EOS in these models, so every request makes exactly its
max_new_tokens on both sides):
  batch1     one 32-token prompt, 128 new tokens, anchor model, fp32.
  batched    32-token prompts x 128 new at HF batch 1/8/32/64 and zerojax with the same
             requests all submitted at once (continuous batching).
  mixed      64 requests, prompt 16-256 and output 16-256 tokens (uniform, seeded):
             MII's mixed-length method. HF runs them in static left-padded batches (sorted
             by prompt length, each batch generating its longest output) at 8/16/32/64 and
             its best batch is the peer; zerojax takes all 64 at once.
  bf16       batch1 with zerojax serving bf16 weights, against HF fp32.
  tiny       batch1 on the ~1M model (per-token overhead, not bandwidth, bounds it).
  pages      the mixed workload on zerojax at page_size 16/32/64/128.

Reported per row: generated tokens/s, TTFT and TPOT (median and p99 over requests), the
ratio to the HF peer. TTFT is from the submission of the batch to a request's first
token; TPOT is (last token - first token) / (tokens - 1). HF times come from a streamer
that stamps every generated token. `roofline` is fp32 weight bytes per token / memory
bandwidth, the bandwidth measured here by a jitted sum over 512 MiB (read only).
"""
from __future__ import annotations

import sys

from _devices import set_device_count  # noqa: E402  (benchmarks/ is on sys.path)
import _machine  # noqa: E402

ON_GPU = "--gpu" in sys.argv
if not ON_GPU:
    set_device_count(1)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from zerojax import inference  # noqa: E402
from zerojax.inference.sampling import SamplingParams  # noqa: E402
from _hf_llama import fixed_requests, hf_model, mixed_requests, param_bytes  # noqa: E402

THREADS = 2
HF_DEVICE = "cuda"


# ---------------------------------------------------------------- timing
class Stamps(BaseStreamer):
    """Times of each generated token of a HF batch (the first put() is the prompt)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if value.is_cuda:
            torch.cuda.synchronize()
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def latency(start: float, stamps: list[list[float]]) -> dict:
    ttft = [s[0] - start for s in stamps]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps if len(s) > 1]
    return {"ttft": ttft, "tpot": tpot}


def run_hf(model, requests, batch_size: int) -> dict:
    """Static left-padded batches in prompt-length order; each batch runs to its longest output."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    stamps: list = [None] * len(requests)
    useful = 0
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        members = order[b:b + batch_size]
        width = max(len(requests[i][0]) for i in members)
        new = max(requests[i][1] for i in members)
        ids = torch.zeros((len(members), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(members):
            prompt = requests[i][0]
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        streamer = Stamps()
        with torch.no_grad():
            ids, mask = ids.to(model.device), mask.to(model.device)
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                           streamer=streamer)
        for row, i in enumerate(members):
            stamps[i] = streamer.times[:requests[i][1]]   # a row's answer is complete at its own length
            useful += requests[i][1]
    wall = time.perf_counter() - start
    return {"tokens": useful, "wall": wall, **latency(start, stamps)}


def run_zerojax(pipe, requests) -> dict:
    engine = pipe.engine
    start = time.perf_counter()
    ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
           for prompt, new in requests]
    stamps = {i: [] for i in ids}
    while engine.has_unfinished():
        events = engine.step()
        now = time.perf_counter()
        for out in events:
            stamps[out.request_id].extend([now] * len(out.new_token_ids))
    wall = time.perf_counter() - start
    tokens = sum(len(engine.release(i).token_ids) for i in ids)
    return {"tokens": tokens, "wall": wall, **latency(start, [stamps[i] for i in ids])}


def best_of(runs: list[dict]) -> dict:
    """The median run by wall time (repeats damp machine noise)."""
    return sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]


def repeat(fn, times: int) -> dict:
    return best_of([fn() for _ in range(times)])


def memory_bandwidth(gib: float, repeats: int = 7) -> float:
    """Bytes/s of a jitted read-only sum over `gib` GiB of fp32 (median of `repeats`)."""
    n = int(gib * 2 ** 30 // 4)
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t)
    del x
    return n * 4 / statistics.median(times)


# ---------------------------------------------------------------- table
def pct(values, q):
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


ROWS: list[tuple] = []


def record(row: str, who: str, result: dict, peer: dict | None = None, note: str = ""):
    rate = result["tokens"] / result["wall"]
    ratio = f"{rate / (peer['tokens'] / peer['wall']):.2f}x" if peer else ""
    ROWS.append((row, who, f"{rate:,.0f}", f"{pct(result['ttft'], 50):.1f}", f"{pct(result['ttft'], 99):.1f}",
                 f"{pct(result['tpot'], 50):.2f}", f"{pct(result['tpot'], 99):.2f}", ratio, note))
    print(f"  {row:8s} {who:24s} {rate:9,.0f} tok/s  {ratio} {note}", flush=True)
    return rate


def print_table(header_lines: list[str]) -> None:
    head = ("row", "who", "tok/s", "TTFT p50 ms", "TTFT p99", "TPOT p50 ms", "TPOT p99", "vs HF", "note")
    widths = [max(len(str(r[i])) for r in ROWS + [head]) for i in range(len(head))]
    print()
    for line in header_lines:
        print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in ROWS:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 mixed requests")
    parser.add_argument("--only", default="batch1,batched,mixed,bf16,tiny,pages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="run on the default GPU backend; HF on cuda too")
    args = parser.parse_args()
    only = set(args.only.split(","))
    repeats = 1 if args.quick else args.repeats
    mixed_count = 16 if args.quick else 64
    torch.set_num_threads(THREADS)
    if args.gpu and jax.default_backend() != "gpu":
        print(f"--gpu: jax's backend is {jax.default_backend()!r}, not gpu; nothing to measure")
        return 0
    machine = f"device: {jax.devices()[0].device_kind}" if args.gpu else _machine.describe()
    header = [machine,
              f"jax {jax.__version__}, torch {torch.__version__} ({THREADS} threads), transformers "
              f"{transformers.__version__}; greedy, fp32 unless noted; median of {repeats} runs"]
    print(header[0], flush=True)

    bandwidth = memory_bandwidth(2.0 if args.gpu else 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        anchor = hf_model("anchor", f"{tmp}/anchor").to(HF_DEVICE if args.gpu else "cpu")
        weight_bytes = param_bytes(anchor)
        roofline_ms = weight_bytes / bandwidth * 1e3
        header.append(f"anchor: {weight_bytes / 4 / 1e6:.1f}M params, {weight_bytes / 1e6:.0f} MB fp32; measured "
                      f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> weight-streaming roofline "
                      f"{roofline_ms:.2f} ms/token ({1e3 / roofline_ms:.0f} tok/s) at batch 1")
        print(header[-1], flush=True)
        pipe = inference.pipeline(f"{tmp}/anchor")
        goals = []

        if "batch1" in only or "bf16" in only:
            one = fixed_requests(1)
            hf1 = repeat(lambda: run_hf(anchor, one, 1), repeats)
            record("batch1", "HF generate", hf1)
            if "batch1" in only:
                z1 = repeat(lambda: run_zerojax(pipe, one), repeats)
                rate = record("batch1", "zerojax", z1, hf1)
                tpot = pct(z1["tpot"], 50)
                goals.append(f"batch 1 >= 1.0x HF: {rate / (hf1['tokens'] / hf1['wall']):.2f}x; TPOT "
                             f"{tpot:.2f} ms vs roofline {roofline_ms:.2f} ms ({tpot / roofline_ms:.2f}x of it, "
                             f"goal <= 1.30x)")
            if "bf16" in only:
                bf16 = inference.pipeline(f"{tmp}/anchor", dtype="bfloat16")
                zb = repeat(lambda: run_zerojax(bf16, one), repeats)
                rate = record("bf16", "zerojax bf16 weights", zb, hf1)
                goals.append(f"bf16 batch 1 >= 1.7x HF fp32: {rate / (hf1['tokens'] / hf1['wall']):.2f}x")
                del bf16

        if "batched" in only:
            reqs = fixed_requests(64)
            best = None
            for size in (8, 32, 64):
                hf = repeat(lambda: run_hf(anchor, reqs[:size], size), repeats)
                record("batched", f"HF generate batch {size}", hf)
                best = hf if best is None or hf["tokens"] / hf["wall"] > best["tokens"] / best["wall"] else best
            for size in (32, 64):
                z = repeat(lambda: run_zerojax(pipe, reqs[:size]), repeats)
                record("batched", f"zerojax {size} requests", z, best, "vs HF's best batch")

        if "mixed" in only or "pages" in only:
            reqs = mixed_requests(mixed_count)
            best, best_size = None, None
            for size in (8, 16, 32, 64):
                if size > mixed_count:
                    continue
                hf = repeat(lambda: run_hf(anchor, reqs, size), 1)
                record("mixed", f"HF generate batch {size}", hf)
                if best is None or hf["tokens"] / hf["wall"] > best["tokens"] / best["wall"]:
                    best, best_size = hf, size
            z = repeat(lambda: run_zerojax(pipe, reqs), repeats)
            rate = record("mixed", f"zerojax {mixed_count} at once", z, best, f"vs HF batch {best_size}")
            goals.append(f"mixed {mixed_count} requests >= 3x HF's best batch: "
                         f"{rate / (best['tokens'] / best['wall']):.2f}x")
            if "pages" in only:
                for page_size in (16, 32, 64, 128):
                    paged = pipe if page_size == pipe.engine.page_size else inference.pipeline(
                        f"{tmp}/anchor", page_size=page_size)
                    zp = repeat(lambda: run_zerojax(paged, reqs), repeats)
                    record("pages", f"zerojax page_size {page_size}", zp, best, f"vs HF batch {best_size}")
        del pipe

        if "tiny" in only:
            tiny = hf_model("tiny", f"{tmp}/tiny").to(HF_DEVICE if args.gpu else "cpu")
            header.append(f"tiny: {param_bytes(tiny) / 4 / 1e6:.2f}M params")
            one = fixed_requests(1)
            hft = repeat(lambda: run_hf(tiny, one, 1), repeats)
            record("tiny", "HF generate", hft)
            tiny_pipe = inference.pipeline(f"{tmp}/tiny")
            zt = repeat(lambda: run_zerojax(tiny_pipe, one), repeats)
            rate = record("tiny", "zerojax", zt, hft)
            goals.append(f"~1M model batch 1 >= 5x HF: {rate / (hft['tokens'] / hft['wall']):.2f}x")

    print_table(header)
    print()
    for goal in goals:
        print("goal:", goal)


if __name__ == "__main__":
    sys.exit(main())
