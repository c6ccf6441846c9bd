"""The compiled ragged step: one forward over a step's tokens, K/V to pages, sampling.

Shapes are static per bucket: `tokens` flat tokens (1, 4, 16, 32, ... up to the
token budget: a lone decoding sequence runs a 1-token step), decode rows `min(max_seqs,
tokens)`, prefill blocks and sampled rows as many as that many tokens can need. Every
bucket is compiled ahead of time by `warmup()`; a step runs the smallest bucket its plan
fits, so no request mix compiles anything after start-up. The pages and the per-slot
penalty state are donated to each step and updated in place. A step's small inputs travel
as one packed int32 vector and its results come back as one (`packing`).

Flat token layout of a step: the decode tokens first (row i = decode sequence i), then the
prefill chunks back to back; padding tokens write to the trash page and attend to nothing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zerojax import compute, host_memory
from zerojax.inference import packing, paged_attention as pa
from zerojax.inference import sampling
from zerojax.inference.scheduler import StepPlan

PAD_KIND, PROMPT_KIND, OUTPUT_KIND = 0, 1, 2     # what a fed token counts as for the penalties


@dataclasses.dataclass(frozen=True)
class Bucket:
    tokens: int
    decode_rows: int
    prefill_blocks: int
    sample_rows: int


def token_buckets(budget: int, smallest: int = 1) -> list[int]:
    """1, 4, 16, 32, 64, 256, 1024, ... below the budget, then the budget itself.

    Doubling from 16 to 64: there a step's cost grows with its rows (attention and, past
    ~16 rows, the matmuls), and 32 running sequences padded to 64 rows cost 34 ms a step
    on the 25M anchor model against 22 ms in a 32-token bucket. Below 16, streaming the
    weights dominates and fewer buckets compile faster."""
    sizes, size = [], smallest
    while size < budget:
        sizes.append(size)
        size *= 2 if 16 <= size < 64 else 4
    return sizes + [budget]


class Runner:
    """Owns the device side of serving: params, pages, per-slot state, compiled buckets."""

    def __init__(self, graphdef, params, rest, policy: compute.ComputePolicy, geometry, *, num_pages: int,
                 page_size: int, max_seqs: int, token_budget: int, max_context: int, query_block: int = 16,
                 max_prefill_chunks: int = 4, num_logprobs: int = 20, pages_per_iter: int | None = None,
                 keep_logits: bool = False, smallest_bucket: int = 1):
        self.graphdef, self.params, self.rest, self.policy = graphdef, params, rest, policy
        self.geometry, self.page_size, self.max_seqs = geometry, page_size, max_seqs
        self.query_block, self.max_chunks = query_block, max_prefill_chunks
        self.num_logprobs = min(num_logprobs, geometry.vocab_size)
        self.pages_per_iter = pages_per_iter or max(1, 64 // page_size)
        self.keep_logits = keep_logits
        self.pages_per_seq = math.ceil(max_context / page_size)
        mesh = policy.mesh
        self.replicated = NamedSharding(mesh, P())
        self.cache_sharding = NamedSharding(mesh, pa.cache_spec(policy))
        self.pages = pa.empty_pages(geometry, num_pages, page_size, policy.dtype, self.cache_sharding)
        V = geometry.vocab_size
        state = jax.jit(lambda: (jnp.zeros((max_seqs, V), jnp.int32), jnp.zeros((max_seqs, V), bool)),
                        out_shardings=(self.replicated, self.replicated))
        self.counts, self.seen = state()
        self.tables = np.zeros((max_seqs, self.pages_per_seq), np.int32)
        self.buckets = [self._bucket(t) for t in token_buckets(token_budget, min(smallest_bucket, token_budget))]
        self._step = jax.jit(self._forward, donate_argnums=(2, 3, 4), static_argnums=(6,),
                             out_shardings=(self.cache_sharding, self.replicated, self.replicated, self.replicated))
        self.executables: dict[int, Any] = {}
        self.layouts = {b.tokens: self._layout(b) for b in self.buckets}
        self.context_tokens = self.pages_per_seq * page_size
        self._prime = jax.jit(_prime_slot, donate_argnums=(0, 1), out_shardings=(self.replicated, self.replicated))
        self._prime_executable = None

    def _bucket(self, tokens: int) -> Bucket:
        chunks = min(self.max_chunks, tokens)
        blocks = min(tokens, math.ceil(tokens / self.query_block) + chunks - 1)
        decode = min(self.max_seqs, tokens)
        return Bucket(tokens, decode, blocks, min(tokens, decode + chunks))

    def _layout(self, bucket: Bucket) -> tuple[packing.Layout, dict]:
        """The packed inputs of a bucket's step, and the shapes of its packed results."""
        T, D, NP, Q, R = bucket.tokens, bucket.decode_rows, bucket.prefill_blocks, self.query_block, bucket.sample_rows
        i32 = np.int32
        fields = {"ids": ((T,), i32), "positions": ((T,), i32), "slot": ((T,), i32), "kind": ((T,), i32),
                  "row_token": ((R,), i32), "reset": ((self.max_seqs,), bool),
                  "write_page": ((T,), i32), "write_offset": ((T,), i32),
                  "block_tables": (self.tables.shape, i32), "kv_lens": ((self.max_seqs,), i32),
                  "decode_token": ((D,), i32), "decode_slot": ((D,), i32), "decode_pos": ((D,), i32),
                  "prefill_token": ((NP, Q), i32), "prefill_slot": ((NP,), i32), "prefill_pos": ((NP, Q), i32)}
        fields.update({f"row.{name}": spec for name, spec in sampling.row_fields(R).items()})
        N, V = self.num_logprobs, self.geometry.vocab_size
        results = {"token": ((R,), np.int32), "logprob": ((R,), np.float32), "top_ids": ((R, N), np.int32),
                   "top_logprobs": ((R, N), np.float32)}
        if self.keep_logits:
            results["logits"] = ((R, V), np.float32)
        return packing.Layout(fields), results

    # ---- the traced step
    def _forward(self, params, rest, pages, counts, seen, packed, tokens):
        fields = self.layouts[tokens][0].unpack(packed)
        batch = {k: fields[k] for k in ("ids", "positions", "slot", "kind", "row_token", "reset")}
        meta = pa.StepMeta(**{f.name: fields[f.name] for f in dataclasses.fields(pa.StepMeta)})
        rows = sampling.Rows(**{k[4:]: v for k, v in fields.items() if k.startswith("row.")})
        model = nnx.merge(self.graphdef, params, rest)
        ids_1T, positions_1T = batch["ids"][None], batch["positions"][None]
        with compute.use(self.policy):
            x_1TD = model.embed(ids_1T, positions_1T)
            kv = pa.PagedKV(pages, meta, kernels=self.policy.kernels, pages_per_iter=self.pages_per_iter)
            x_1TD, kv = model.run_layers_cached(x_1TD, positions_1T, kv)
            logits_RV = model.head_logits(x_1TD[:, batch["row_token"]])[0]
        reset = batch["reset"][:, None]
        counts, seen = jnp.where(reset, 0, counts), jnp.where(reset, False, seen)
        counts, seen = _count_tokens(counts, seen, batch["slot"], batch["ids"], batch["kind"])
        out = sampling.sample(logits_RV, rows, seen, counts, self.num_logprobs)
        counts = counts.at[rows.slot, out["token"]].add(rows.valid.astype(jnp.int32))
        if self.keep_logits:
            out["logits"] = logits_RV
        return kv.pages, counts, seen, packing.pack_outputs({k: out[k] for k in self.layouts[tokens][1]})

    # ---- host side
    def warmup(self) -> None:
        """Compile every bucket now (start-up), so serving never compiles."""
        for bucket in self.buckets:
            self._executable(bucket)
        self._prime_slot_executable()

    def _prime_slot_executable(self):
        if self._prime_executable is None:
            struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)
            C = self.context_tokens
            self._prime_executable = self._prime.lower(
                self.counts, self.seen, struct((), jnp.int32), struct((C,), jnp.int32),
                struct((C,), jnp.int32)).compile()
        return self._prime_executable

    def prime_slot(self, seq, upto: int) -> None:
        """Start `seq`'s slot from its first `upto` tokens, whose K/V came from the prefix
        cache and are never fed: the penalties must still see them."""
        ids, kinds = np.zeros(self.context_tokens, np.int32), np.zeros(self.context_tokens, np.int32)
        ids[:upto] = seq.tokens[:upto]
        kinds[:upto] = np.where(np.arange(upto) < seq.prompt_len, PROMPT_KIND, OUTPUT_KIND)
        put = lambda x: jax.device_put(x, self.replicated)
        self.counts, self.seen = self._prime_slot_executable()(
            self.counts, self.seen, put(np.int32(seq.slot)), put(ids), put(kinds))

    def _executable(self, bucket: Bucket):
        if bucket.tokens not in self.executables:
            layout = self.layouts[bucket.tokens][0]
            packed = jax.ShapeDtypeStruct((layout.size,), jnp.int32, sharding=self.replicated)
            self.executables[bucket.tokens] = self._step.lower(
                self.params, self.rest, self.pages, self.counts, self.seen, packed, bucket.tokens).compile()
            host_memory.release_freed()
        return self.executables[bucket.tokens]

    def bucket_for(self, plan: StepPlan) -> Bucket:
        for bucket in self.buckets:
            blocks = sum(math.ceil(c.length / self.query_block) for c in plan.prefill)
            if plan.tokens <= bucket.tokens and len(plan.decode) <= bucket.decode_rows \
                    and blocks <= bucket.prefill_blocks:
                return bucket
        raise RuntimeError(f"a step of {plan.tokens} tokens fits no bucket (the scheduler keeps to the budget)")

    def _host_arrays(self, bucket: Bucket):
        """The packed buffer of a step and views of its fields, set to padding."""
        buffer, views = self.layouts[bucket.tokens][0].host()
        T = bucket.tokens
        views["write_page"][:] = pa.TRASH_PAGE
        for name in ("decode_token", "prefill_token"):
            views[name][:] = T                                  # flat index T: padding
        for name in ("decode_pos", "prefill_pos"):
            views[name][:] = -1
        for name, value in sampling.ROW_PADDING.items():
            views[f"row.{name}"][:] = value
        rows = {k[4:]: v for k, v in views.items() if k.startswith("row.")}
        return buffer, views, rows

    def run(self, plan: StepPlan) -> tuple[dict[str, np.ndarray], list]:
        """Run one planned step; returns the sampled outputs and, per row, its sequence."""
        bucket = self.bucket_for(plan)
        buffer, fields, rows = self._host_arrays(bucket)
        row_seqs: list = [None] * bucket.sample_rows
        flat = 0

        def feed(seq, start, length, decode=False):
            nonlocal flat
            span = slice(flat, flat + length)
            positions = np.arange(start, start + length)
            fields["ids"][span] = seq.tokens[start:start + length]
            fields["positions"][span] = positions
            fields["slot"][span] = seq.slot
            # A decode token was counted when it was drawn; a recomputed one is counted again
            # (the slot's state was reset when the sequence was re-admitted).
            fields["kind"][span] = PAD_KIND if decode else np.where(positions < seq.prompt_len, PROMPT_KIND,
                                                                   OUTPUT_KIND)
            pages = np.asarray(seq.pages, np.int32)
            fields["write_page"][span] = pages[positions // self.page_size]
            fields["write_offset"][span] = positions % self.page_size
            self.tables[seq.slot, :len(seq.pages)] = seq.pages
            self.tables[seq.slot, len(seq.pages):] = pa.TRASH_PAGE
            fields["kv_lens"][seq.slot] = start + length
            if seq.reset_slot and start > 0:
                self.prime_slot(seq, start)                # resets the slot itself
            else:
                fields["reset"][seq.slot] |= seq.reset_slot
            flat += length
            return span, positions

        for i, seq in enumerate(plan.decode):
            span, positions = feed(seq, seq.num_computed, 1, decode=True)
            fields["decode_token"][i], fields["decode_slot"][i], fields["decode_pos"][i] = span.start, seq.slot, positions[0]
            self._row(fields, rows, row_seqs, i, seq, span.start)
        block = 0
        for c, chunk in enumerate(plan.prefill):
            span, positions = feed(chunk.seq, chunk.start, chunk.length)
            for offset in range(0, chunk.length, self.query_block):
                n = min(self.query_block, chunk.length - offset)
                fields["prefill_token"][block, :n] = np.arange(span.start + offset, span.start + offset + n)
                fields["prefill_pos"][block, :n] = positions[offset:offset + n]
                fields["prefill_slot"][block] = chunk.seq.slot
                block += 1
            if chunk.sample:
                self._row(fields, rows, row_seqs, len(plan.decode) + c, chunk.seq, span.stop - 1)
        fields["block_tables"][:] = self.tables
        self.pages, self.counts, self.seen, out = self._executable(bucket)(
            self.params, self.rest, self.pages, self.counts, self.seen, jax.device_put(buffer, self.replicated))
        return packing.unpack_outputs(np.asarray(out), self.layouts[bucket.tokens][1]), row_seqs

    @staticmethod
    def _row(batch, rows, row_seqs, r, seq, token_index):
        batch["row_token"][r] = token_index
        sampling.fill_row(rows, r, slot=seq.slot, params=seq.params, seed=seq.seed,
                          index=len(seq.tokens) - seq.prompt_len, stop_ids=seq.stop_ids)
        row_seqs[r] = seq

    def set_params(self, params) -> None:
        """New weights in the same layout (the hybrid engine's update); no recompile."""
        self.params = params


def _count_tokens(counts_SV, seen_SV, slots, ids, kinds):
    """The penalty state of fed tokens: prompt ids are `seen` (repetition penalty), output
    ids are counted (presence/frequency); padding is neither."""
    where = (slots, ids)
    seen_SV = seen_SV.at[where].max(kinds == PROMPT_KIND)
    counts_SV = counts_SV.at[where].add((kinds == OUTPUT_KIND).astype(jnp.int32))
    return counts_SV, seen_SV


def _prime_slot(counts_SV, seen_SV, slot, ids, kinds):
    counts_SV, seen_SV = counts_SV.at[slot].set(0), seen_SV.at[slot].set(False)
    return _count_tokens(counts_SV, seen_SV, jnp.full_like(ids, slot), ids, kinds)
