"""Continuous batching with Dynamic SplitFuse: what each engine step computes.

Every step fills one fixed token budget: first one decode token for every running
sequence, then prompt chunks (the unfinished prompts first, then newly admitted ones, in
arrival order); a long prompt is split over as many steps as it needs. At most
`max_seqs` sequences run at once (each holds a slot: its rows of per-sequence state on
the device) and at most `max_prefill_chunks` prompts are chunked per step.

Memory: pages are handed out as tokens are written. A waiting request is admitted only
when the pages its whole prompt needs are available (after prefix-cache hits), so a
prompt's prefill never stalls for pages it was admitted with. When a running sequence
needs a page and none is left, the newest running sequence is preempted: its pages go
back to the pool and it waits at its arrival place to be recomputed (prompt plus what it
generated), as vLLM does. The oldest sequence always progresses, so nothing deadlocks;
a request that could not fit even alone is refused when it is added.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
from zerojax.inference.kv_cache import PagePool, pages_for
from zerojax.inference.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens (prompt, then output) and its place in the cache."""

    request_id: str
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    seed: int
    arrival: int
    max_new_tokens: int                  # resolved: what fits in the context
    stop_ids: tuple[int, ...]            # EOS (unless ignored) + stop_token_ids
    num_computed: int = 0                # tokens whose K/V are in the pages
    pages: list[int] = dataclasses.field(default_factory=list)
    registered: int = 0                  # leading pages recorded in the prefix cache
    slot: int | None = None
    reset_slot: bool = False             # the device must clear this slot's state first
    preemptions: int = 0

    @property
    def remaining(self) -> int:
        """Tokens to feed before the next one can be drawn (1 in the decode phase)."""
        return len(self.tokens) - self.num_computed

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclasses.dataclass
class Chunk:
    """`length` tokens of `seq` from position `start`; `sample` when they reach its end."""

    seq: Sequence
    start: int
    length: int

    @property
    def sample(self) -> bool:
        return self.start + self.length == len(self.seq.tokens)


@dataclasses.dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[Chunk]

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, pool: PagePool, *, max_seqs: int, token_budget: int, max_prefill_chunks: int = 4):
        self.pool, self.max_seqs, self.token_budget = pool, max_seqs, token_budget
        self.max_prefill_chunks = max_prefill_chunks
        self.waiting: list[Sequence] = []          # by arrival
        self.running: list[Sequence] = []          # by arrival
        self.free_slots = collections.deque(range(max_seqs))
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step
    def schedule(self) -> StepPlan:
        plan = StepPlan([], [])
        for seq in list(self.running):
            if seq in self.running and seq.remaining == 1 and self._grow(seq, seq.num_computed + 1, plan):
                plan.decode.append(seq)
        budget = self.token_budget - len(plan.decode)
        for seq in list(self.running):
            if budget == 0 or len(plan.prefill) == self.max_prefill_chunks:
                break
            if seq in self.running and seq.remaining > 1:
                length = min(seq.remaining, budget)
                if self._grow(seq, seq.num_computed + length, plan):
                    plan.prefill.append(Chunk(seq, seq.num_computed, length))
                    budget -= length
        while (self.waiting and self.free_slots and budget > 0
               and len(plan.prefill) < self.max_prefill_chunks and self._admit(self.waiting[0])):
            seq = self.waiting.pop(0)
            length = min(seq.remaining, budget)
            self._grow(seq, seq.num_computed + length, plan)      # admitted with these pages free
            plan.prefill.append(Chunk(seq, seq.num_computed, length))
            budget -= length
        return plan

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` a slot and its cached prefix if its whole prompt's pages are available."""
        cached = self.pool.match_prefix(seq.tokens)
        if self.pool.available() < pages_for(len(seq.tokens), self.pool.page_size) - len(cached):
            self.pool.release(cached)
            return False
        seq.pages, seq.num_computed = cached, len(cached) * self.pool.page_size
        seq.registered = len(cached)
        seq.slot, seq.reset_slot = self.free_slots.popleft(), True
        bisect.insort(self.running, seq, key=lambda s: s.arrival)
        return True

    def _grow(self, seq: Sequence, tokens: int, plan: StepPlan) -> bool:
        """Pages for `tokens` positions of `seq`, preempting the newest sequences if needed.
        False if `seq` itself had to be preempted."""
        while len(seq.pages) < pages_for(tokens, self.pool.page_size):
            if self.pool.available() == 0:
                victim = self.running[-1]
                self.preempt(victim, plan)
                if victim is seq:
                    return False
                continue
            seq.pages.append(self.pool.allocate())
        return True

    def preempt(self, seq: Sequence, plan: StepPlan | None = None) -> None:
        """Free `seq`'s pages and slot; it waits to be recomputed from its tokens."""
        self._leave(seq)
        seq.num_computed = seq.registered = 0
        seq.preemptions += 1
        self.preemptions += 1
        if plan is not None:
            plan.decode[:] = [s for s in plan.decode if s is not seq]
            plan.prefill[:] = [c for c in plan.prefill if c.seq is not seq]
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None

    def computed(self, plan: StepPlan) -> None:
        """After the step: the planned tokens are in the pages; full pages join the prefix cache."""
        for seq, length in [(s, 1) for s in plan.decode] + [(c.seq, c.length) for c in plan.prefill]:
            seq.num_computed += length
            seq.reset_slot = False
            full = seq.num_computed // self.pool.page_size
            self.pool.register(seq.pages, seq.tokens, full, seq.registered)
            seq.registered = max(seq.registered, full)

