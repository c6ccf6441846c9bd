"""The Pallas kernels compiled on one GPU: correctness, speed against XLA's own, and the MFU
of a ~1B Llama train step.

    python3 benchmarks/kernels_gpu.py              # all three parts; ~3-5 minutes on an H200
    python3 benchmarks/kernels_gpu.py --no-mfu     # parts 1 and 2 only
    python3 benchmarks/kernels_gpu.py --iters 50   # more timed iterations per row

Needs a GPU backend; anywhere else it prints one line and exits 0.

(1) Correctness, compiled (interpret=False), fresh random inputs: each kernel's forward and
    every gradient against a plain-jnp reference computed in fp32 at "highest" matmul
    precision on the same (upcast) inputs; ||out - ref|| / ||ref||. Tolerances: 2e-2 for
    bf16 inputs, 5e-3 for fp32 (Triton runs fp32 dots as tf32).
(2) Timings at realistic sizes, median ms over >= 20 iterations after warm-up, each timed
    to `block_until_ready` (the first call compiles and is not timed):
      attention  B=4, L=4096, H=32, G=8 K/V heads, hd=128, bf16, causal; forward and
                 forward+backward (the vjp with a fixed random cotangent) against
                 jax.nn.dot_product_attention(implementation="cudnn" / "xla").
                 FLOPs: forward 4*B*H*L^2*hd / 2 (causal: half the score matrix),
                 forward+backward 2.5x that.
      rms_norm / layer_norm  x [8*4096, 4096] bf16 against the jnp reference (XLA-fused).
                 Memory-bound, so GB/s instead of TFLOP/s: forward moves 2*N*D*2 bytes
                 (read x, write y), forward+backward 5*N*D*2 (+ read dy, x; write dx).
      fused linear CE  T=8192, D=2048, V=32000, bf16 hidden and head [D, V], fp32 loss,
                 against the unfused XLA loss (fp32 [T, V] logits, logsumexp, target).
                 FLOPs: forward 2*T*D*V, forward+backward 6*T*D*V (model FLOPs; the fused
                 backward recomputes the logits twice more, which is not counted).
    "speed-up" on a Pallas row is peer ms / Pallas ms for each peer (> 1: Pallas faster).
(3) MFU of a ~1B Llama (hidden 2048, intermediate 5632, 16 layers, 16 heads, 8 K/V heads,
    vocab 32000, seq 2048; 0.89B params) train step through `zerojax.initialize` on one GPU:
    bf16 compute with fp32 master params, AdamW, ZeRO-0, no remat, kernels "pallas" and
    "xla", micro-batch 8 x 2048 tokens (halved on out-of-memory). Median step ms over the
    timed steps after 3 warm-up steps.
      MFU(cost)  = zerojax.trainer.step_flops(engine, batch) of the "xla" engine
                   / (median step s * 989e12, the H200 dense bf16 peak). Both rows use the
                   xla engine's count: XLA's cost analysis sees no FLOPs inside Pallas
                   custom calls, so the pallas engine's own count (printed) is too low.
      MFU(6N)    = (6 * N_matmul * T + 6 * layers * H * hd * L * T) / (step s * 989e12), with
                   N_matmul the params of every matmul (layers + LM head, not the embedding
                   table) and T tokens per step: the usual analytic model FLOPs, causal.
"""
from __future__ import annotations

import argparse
import gc
import math
import signal
import statistics
import sys
import time
import traceback

import jax

if jax.default_backend() != "gpu":
    print(f"kernels_gpu.py needs a GPU (jax.default_backend() is {jax.default_backend()!r}); "
          "nothing to do.")
    sys.exit(0)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from zerojax.kernels import fused_linear_cross_entropy, flash_attention, layer_norm, rms_norm  # noqa: E402

PEAK = 989e12        # H200 (SXM) dense bf16, as zerojax.trainer.PEAK_FLOPS["H200"]
EPS = 1e-5
TOL = {"bfloat16": 2e-2, "float32": 5e-3}
ROWS: list[list[str]] = []      # the one table, printed at the end
FAILURES: list[str] = []
START = time.perf_counter()
BUDGET_S = [280.0]               # --budget: part 3 skips an engine that would not fit


class Stopped(BaseException):
    """SIGTERM (e.g. from `timeout`): stop where we are and print the table so far."""


def _on_sigterm(signum, frame):
    raise Stopped()


def log(msg: str) -> None:
    print(msg, flush=True)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:150]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def row(part, name, impl, ms="", tflops="", gbs="", note=""):
    ROWS.append([part, name, impl, ms, tflops, gbs, note])


# ----------------------------------------------------------------------------- references

def ref_attention(q, k, v, causal):
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    if causal:
        keep = jnp.arange(k.shape[1])[None, :] <= jnp.arange(q.shape[1])[:, None]
        s = jnp.where(keep, s, -jnp.inf)
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, axis=-1), v)


def ref_rms_norm(x, w, eps=EPS):
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * (x32 * rstd).astype(x.dtype)


def ref_layer_norm(x, w, b, eps=EPS):
    x32 = x.astype(jnp.float32)
    c = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + eps)
    return (c * rstd * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def ref_ce_sum(h, w, labels, ignore=-100):
    logits = jnp.einsum("td,dv->tv", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    mask = labels != ignore
    tgt = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(mask, lse - tgt, 0.0))


# ----------------------------------------------------------------------------- helpers

def normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def vjp_fn(f):
    """(args..., cot) -> (out, grads): forward + backward of f with a given cotangent."""
    def run(*args_and_cot):
        *args, cot = args_and_cot
        out, pull = jax.vjp(f, *args)
        return out, pull(cot)
    return run


def compare(fused, ref, args, cot, dtype_name):
    """Max rel err over the output and every gradient of fused vs ref (ref in fp32/highest)."""
    out, grads = jax.jit(vjp_fn(fused))(*args, cot)
    up = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    with jax.default_matmul_precision("highest"):
        r_out, r_grads = jax.jit(vjp_fn(ref))(*up, cot.astype(jnp.float32))
    errs = [rel(out, r_out)] + [rel(g, r) for g, r in zip(grads, r_grads)]
    return errs


def record_check(name, errs, dtype_name, labels):
    tol = TOL[dtype_name]
    worst = max(errs) if not any(math.isnan(e) for e in errs) else float("nan")
    ok = worst <= tol
    detail = " ".join(f"{lab} {e:.1e}" for lab, e in zip(labels, errs))
    verdict = "PASS" if ok else "FAIL"
    if not ok:
        FAILURES.append(name)
    row("1 check", name, dtype_name, note=f"{verdict} max {worst:.1e} (tol {tol:g}): {detail}")
    log(f"  {name} {dtype_name}: {verdict} {detail}")


def run_check(name, dtype_name, labels, thunk):
    try:
        record_check(name, thunk(), dtype_name, labels)
    except Exception as e:  # a kernel that fails to compile or run is a row, not a crash
        FAILURES.append(name)
        row("1 check", name, dtype_name, note="ERROR " + short_error(e))
        log(f"  {name} {dtype_name}: ERROR")
        traceback.print_exc()


def bench(fn, args, iters: int, warmup: int = 3) -> float:
    """Median ms of fn(*args) over `iters` calls, each to block_until_ready; compiles first."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timed(part, name, impl, fn, args, iters, flops=None, nbytes=None):
    """Time one row; returns ms or None (the error goes into the row)."""
    try:
        ms = bench(fn, args, iters)
    except Exception as e:
        row(part, name, impl, note="ERROR " + short_error(e))
        log(f"  {name} [{impl}]: ERROR {short_error(e)}")
        return None
    tf = f"{flops / (ms * 1e-3) / 1e12:.1f}" if flops else ""
    gb = f"{nbytes / (ms * 1e-3) / 1e9:.0f}" if nbytes else ""
    row(part, name, impl, f"{ms:.3f}", tf, gb)
    log(f"  {name} [{impl}]: {ms:.3f} ms")
    return ms


def add_speedups(first_row: int, pallas_impl_prefix: str = "pallas") -> None:
    """On each Pallas row among ROWS[first_row:] of the same name, note peer ms / its ms."""
    group = ROWS[first_row:]
    for r in group:
        if not r[2].startswith(pallas_impl_prefix) or not r[3]:
            continue
        peers = [p for p in group if p[1] == r[1] and not p[2].startswith(pallas_impl_prefix)]
        parts = []
        for p in peers:
            parts.append(f"vs {p[2]} {float(p[3]) / float(r[3]):.2f}x" if p[3] else f"vs {p[2]} n/a")
        r[6] = (r[6] + " " if r[6] else "") + ", ".join(parts)


# ----------------------------------------------------------------------------- (1) correctness

def part1():
    log("(1) compiled correctness")
    keys = iter(jax.random.split(jax.random.key(1234), 64))

    # flash attention: GQA, causal and not, a length that pads to a power of two (1000 ->
    # 1024) and one that does not (1100 -> 1152), head_dim 128 (bf16) and 64 (fp32).
    for (b, length, h, g, hd, causal, dtype) in [
            (2, 1000, 8, 2, 128, True, jnp.bfloat16),
            (2, 1000, 8, 2, 128, False, jnp.bfloat16),
            (2, 1100, 8, 8, 128, True, jnp.bfloat16),
            (2, 1000, 8, 2, 64, True, jnp.float32)]:
        dn = jnp.dtype(dtype).name
        name = f"flash_attention B{b} L{length} H{h} G{g} hd{hd} {'causal' if causal else 'full'}"

        def thunk(b=b, length=length, h=h, g=g, hd=hd, causal=causal, dtype=dtype):
            q = normal(next(keys), (b, length, h, hd), dtype)
            k = normal(next(keys), (b, length, g, hd), dtype)
            v = normal(next(keys), (b, length, g, hd), dtype)
            cot = normal(next(keys), (b, length, h, hd), dtype)
            return compare(lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False),
                           lambda q, k, v: ref_attention(q, k, v, causal), (q, k, v), cot, dn)
        run_check(name, dn, ("out", "dq", "dk", "dv"), thunk)

    # norms: rows not a multiple of the block, D a power of two and not.
    for (rows, d, dtype) in [(4000, 4096, jnp.bfloat16), (999, 1000, jnp.float32)]:
        dn = jnp.dtype(dtype).name

        def rms_thunk(rows=rows, d=d, dtype=dtype):
            x = normal(next(keys), (rows, d), dtype)
            w = normal(next(keys), (d,), dtype, 0.1) + jnp.asarray(1.0, dtype)
            cot = normal(next(keys), (rows, d), dtype)
            return compare(lambda x, w: rms_norm(x, w, eps=EPS, interpret=False),
                           ref_rms_norm, (x, w), cot, dn)

        def ln_thunk(rows=rows, d=d, dtype=dtype):
            x = normal(next(keys), (rows, d), dtype)
            w = normal(next(keys), (d,), dtype, 0.1) + jnp.asarray(1.0, dtype)
            bias = normal(next(keys), (d,), dtype, 0.1)
            cot = normal(next(keys), (rows, d), dtype)
            return compare(lambda x, w, bb: layer_norm(x, w, bb, eps=EPS, interpret=False),
                           ref_layer_norm, (x, w, bias), cot, dn)
        run_check(f"rms_norm [{rows}, {d}]", dn, ("out", "dx", "dw"), rms_thunk)
        run_check(f"layer_norm [{rows}, {d}]", dn, ("out", "dx", "dw", "db"), ln_thunk)

    # fused linear CE: the timed D (2048) with the real vocab, and odd sizes in fp32.
    for (t, d, v, dtype) in [(1000, 2048, 32000, jnp.bfloat16), (777, 1000, 5000, jnp.float32)]:
        dn = jnp.dtype(dtype).name

        def ce_thunk(t=t, d=d, v=v, dtype=dtype):
            h = normal(next(keys), (t, d), dtype)
            w = normal(next(keys), (d, v), dtype, 3 / np.sqrt(d))
            labels = jax.random.randint(next(keys), (t,), 0, v)
            labels = jnp.where(jax.random.uniform(next(keys), (t,)) < 0.25, -100, labels).astype(jnp.int32)
            cot = jnp.asarray(1.0, jnp.float32)
            return compare(lambda h, w: fused_linear_cross_entropy(h, w, labels, interpret=False)[0],
                           lambda h, w: ref_ce_sum(h, w, labels), (h, w), cot, dn)
        run_check(f"fused_linear_CE T{t} D{d} V{v}", dn, ("loss", "dh", "dw"), ce_thunk)


# ----------------------------------------------------------------------------- (2) timings

def part2(iters: int):
    log("(2) timings")
    keys = iter(jax.random.split(jax.random.key(99), 64))

    # attention
    B, L, H, G, HD = 4, 4096, 32, 8, 128
    dt = jnp.bfloat16
    q = normal(next(keys), (B, L, H, HD), dt)
    k = normal(next(keys), (B, L, G, HD), dt)
    v = normal(next(keys), (B, L, G, HD), dt)
    cot = normal(next(keys), (B, L, H, HD), dt)
    fwd_flops = 4 * B * H * L * L * HD / 2
    impls = [("pallas", lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False)),
             ("pallas bq64 bk64", lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=64,
                                                                  block_k=64, interpret=False)),
             ("pallas bq128 bk64", lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=128,
                                                                   block_k=64, interpret=False)),
             ("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                   implementation="cudnn")),
             ("xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="xla"))]
    name_f = f"attention fwd B{B} L{L} H{H} G{G} hd{HD}"
    name_b = f"attention fwd+bwd B{B} L{L} H{H} G{G} hd{HD}"
    start = len(ROWS)
    for impl, f in impls:
        timed("2 time", name_f, impl, jax.jit(f), (q, k, v), iters, flops=fwd_flops)
    for impl, f in impls:
        timed("2 time", name_b, impl, jax.jit(vjp_fn(f)), (q, k, v, cot), iters, flops=2.5 * fwd_flops)
    add_speedups(start)
    del q, k, v, cot
    gc.collect()

    # norms
    N, D = 8 * 4096, 4096
    x = normal(next(keys), (N, D), dt)
    w = normal(next(keys), (D,), dt, 0.1) + jnp.asarray(1.0, dt)
    bias = normal(next(keys), (D,), dt, 0.1)
    dy = normal(next(keys), (N, D), dt)
    fwd_bytes, fb_bytes = 2 * N * D * 2, 5 * N * D * 2
    start = len(ROWS)
    for label, fused, ref, args in [
            ("rms_norm", lambda x, w: rms_norm(x, w, eps=EPS, interpret=False), ref_rms_norm, (x, w)),
            ("layer_norm", lambda x, w, b: layer_norm(x, w, b, eps=EPS, interpret=False),
             ref_layer_norm, (x, w, bias))]:
        for impl, f in (("pallas", fused), ("xla", ref)):
            timed("2 time", f"{label} fwd [{N}, {D}]", impl, jax.jit(f), args, iters, nbytes=fwd_bytes)
        for impl, f in (("pallas", fused), ("xla", ref)):
            timed("2 time", f"{label} fwd+bwd [{N}, {D}]", impl, jax.jit(vjp_fn(f)), (*args, dy), iters,
                  nbytes=fb_bytes)
    add_speedups(start)
    del x, w, bias, dy
    gc.collect()

    # fused linear cross-entropy
    T, D, V = 8192, 2048, 32000
    h = normal(next(keys), (T, D), dt)
    head = normal(next(keys), (D, V), dt, 3 / np.sqrt(D))
    labels = jax.random.randint(next(keys), (T,), 0, V).astype(jnp.int32)
    fused = lambda h, w, lab: fused_linear_cross_entropy(h, w, lab, interpret=False)[0]  # noqa: E731
    start = len(ROWS)
    for impl, f in (("pallas", fused), ("xla", ref_ce_sum)):
        timed("2 time", f"linear CE fwd T{T} D{D} V{V}", impl, jax.jit(f), (h, head, labels), iters,
              flops=2 * T * D * V)
    for impl, f in (("pallas", fused), ("xla", ref_ce_sum)):
        def fb(h, w, lab, f=f):
            return jax.value_and_grad(f, argnums=(0, 1))(h, w, lab)
        timed("2 time", f"linear CE fwd+bwd T{T} D{D} V{V}", impl, jax.jit(fb), (h, head, labels), iters,
              flops=6 * T * D * V)
    add_speedups(start)
    try:   # the point of the fused loss: compiled temp memory, fused vs unfused
        def temp(f):
            c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, head, labels).compile()
            return c.memory_analysis().temp_size_in_bytes / 2**20
        row("2 time", f"linear CE fwd+bwd T{T} D{D} V{V}", "temp MiB",
            note=f"pallas {temp(fused):.0f} MiB vs xla {temp(ref_ce_sum):.0f} MiB "
                 f"(fp32 logits alone {T * V * 4 / 2**20:.0f} MiB)")
    except Exception as e:
        row("2 time", "linear CE temp memory", "", note="ERROR " + short_error(e))
    del h, head, labels
    gc.collect()


# ----------------------------------------------------------------------------- (3) MFU

def part3(steps: int, micro_batch: int):
    log("(3) ~1B Llama train step MFU")
    import zerojax
    from zerojax.models import Llama, LlamaConfig
    from zerojax.trainer import step_flops

    seq = 2048
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=seq)
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_layer = (cfg.hidden_size * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    n_matmul = cfg.num_hidden_layers * per_layer + cfg.hidden_size * cfg.vocab_size  # + LM head
    n_total = n_matmul + cfg.vocab_size * cfg.hidden_size + (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    log(f"  params {n_total / 1e9:.3f}B (matmul {n_matmul / 1e9:.3f}B)")

    def build(kernels: str, mb: int):
        config = {
            "train_batch_size": mb,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01}},
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0},
            "zerojax": {"kernels": kernels, "remat": "none", "seed": 0},
        }
        return zerojax.initialize(model_fn=lambda rngs: Llama(cfg, rngs=rngs), config=config,
                                  devices=jax.devices()[:1])

    def batches(mb):
        rng = np.random.default_rng(0)
        return [{"input_ids": rng.integers(0, cfg.vocab_size, size=(mb, seq), dtype=np.int32)}
                for _ in range(4)]

    def measure(kernels: str, mb: int):
        engine = build(kernels, mb)
        data = batches(mb)
        flops = step_flops(engine, data[0])
        t0 = time.perf_counter()
        metrics = engine.train_step(data[0])          # compiles; the old state is donated
        jax.block_until_ready((engine.state, metrics))
        first = time.perf_counter() - t0
        for i in range(2):
            metrics = engine.train_step(data[1 + i])
            jax.block_until_ready((engine.state, metrics))
        times, losses = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            metrics = engine.train_step(data[i % len(data)])
            jax.block_until_ready((engine.state, metrics))
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
        del engine
        gc.collect()
        return statistics.median(times), flops, first, losses[-1]

    results = {}
    for kernels in ("pallas", "xla"):
        left = BUDGET_S[0] - (time.perf_counter() - START)
        if left < 75:
            row("3 MFU", "Llama 0.89B train step bf16", kernels,
                note=f"SKIPPED: {left:.0f} s of the --budget left (an engine takes ~40-70 s)")
            log(f"  {kernels}: skipped, {left:.0f} s left")
            continue
        mb = micro_batch
        while True:
            try:
                results[kernels] = (mb, *measure(kernels, mb))
                break
            except Exception as e:
                oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
                gc.collect()
                jax.clear_caches()
                if oom and mb > 1:
                    log(f"  {kernels}: out of memory at micro-batch {mb}; halving")
                    mb //= 2
                    continue
                row("3 MFU", "Llama 0.89B train step", kernels, note="ERROR " + short_error(e))
                log(f"  {kernels}: ERROR")
                traceback.print_exc()
                break
        gc.collect()
        jax.clear_caches()

    xla_flops = results.get("xla", (None, None, None))[2]
    for kernels, (mb, step_s, own_flops, first, loss) in results.items():
        tokens = mb * seq
        analytic = (6 * n_matmul * tokens
                    + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * seq * tokens)
        # both rows are scaled to their own token count from the xla engine's count
        cost = xla_flops * tokens / (results["xla"][0] * seq) if xla_flops else None
        mfu_cost = f"MFU(cost) {100 * cost / (step_s * PEAK):.1f}%" if cost else "MFU(cost) n/a"
        note = (f"{mfu_cost}  MFU(6N) {100 * analytic / (step_s * PEAK):.1f}%  "
                f"{tokens / step_s:,.0f} tok/s  mb {mb}x{seq}  compile+1st {first:.0f}s  "
                f"step_flops own {own_flops or 0:.3g} xla {xla_flops or 0:.3g} 6N {analytic:.3g}  "
                f"loss {loss:.3f}")
        row("3 MFU", "Llama 0.89B train step bf16", kernels, f"{step_s * 1e3:.1f}",
            f"{analytic / step_s / 1e12:.1f}", note=note)
        log(f"  {kernels}: {step_s * 1e3:.1f} ms/step")


# ----------------------------------------------------------------------------- main

def print_table() -> None:
    head = ["part", "what", "impl", "ms", "TFLOP/s", "GB/s", "notes"]
    rows = [head] + ROWS
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    print()
    for r in rows:
        print(" | ".join(c.ljust(widths[i]) if i < 6 else c for i, c in enumerate(r)).rstrip())
    print()
    print("TFLOP/s: attention 4*B*H*L^2*hd/2 (fwd, causal), x2.5 fwd+bwd; CE 2*T*D*V fwd, 6*T*D*V "
          "fwd+bwd; MFU rows 6*N_matmul*T + 6*layers*H*hd*L*T. GB/s (norms): 2*N*D*2 B fwd, "
          f"5*N*D*2 B fwd+bwd. MFU peak {PEAK:.3g} FLOP/s (H200 dense bf16).")
    checks = sum(r[0] == "1 check" for r in ROWS)
    print(f"correctness: {checks} checks run, " + ("all PASS" if not FAILURES else
          f"{len(FAILURES)} FAIL/ERROR: " + "; ".join(FAILURES)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=25, help="timed iterations per kernel row (>= 20)")
    ap.add_argument("--steps", type=int, default=10, help="timed train steps per MFU row")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows of 2048 tokens per MFU step")
    ap.add_argument("--no-check", action="store_true", help="skip part 1")
    ap.add_argument("--no-time", action="store_true", help="skip part 2")
    ap.add_argument("--no-mfu", action="store_true", help="skip part 3")
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds; part 3 skips an engine when under 75 s of it are left")
    args = ap.parse_args()
    BUDGET_S[0] = args.budget
    signal.signal(signal.SIGTERM, _on_sigterm)
    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.device_kind} ({jax.device_count()} device(s)); timing device 0")
    t0 = START
    for skip, name, fn in ((args.no_check, "1", part1), (args.no_time, "2", lambda: part2(max(args.iters, 20))),
                           (args.no_mfu, "3", lambda: part3(args.steps, args.micro_batch))):
        if skip:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Stopped:
            row(f"{name} ?", f"part {name}", "", note="STOPPED by SIGTERM (time limit); rows above are complete")
            log(f"  part {name}: stopped by SIGTERM")
            break
        except Exception as e:   # never lose the table for one part's failure
            row(f"{name} ?", f"part {name}", "", note="ERROR " + short_error(e))
            traceback.print_exc()
        log(f"  part {name}: {time.perf_counter() - t:.0f} s")
        gc.collect()
        jax.clear_caches()
    print_table()
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
