"""Per-request sampling: the parameters (MII's and vLLM's names) and the batched device step.

Defaults are DeepSpeed-MII's `GenerateParamsConfig`: `do_sample=True`, `top_p=0.9`,
`top_k=None` (off), `temperature=None` (1.0), `min_new_tokens=0`, `ignore_eos=False`,
`stop=[]`, and `max_new_tokens=None`, which means "up to the context" (MII's
`max_length - prompt_length`, with the engine's `max_context` as `max_length`). Added
from Hugging Face and vLLM: `repetition_penalty` (HF semantics), `presence_penalty` and
`frequency_penalty` (OpenAI semantics, over generated tokens), `stop_token_ids`, `n`,
`seed`, `logprobs`. `temperature=0` or `do_sample=False` is greedy whatever the other
knobs say.

On device every row (one sequence's next token) is processed independently, in HF's
order: penalties, `min_new_tokens` masking, then temperature, top-k, top-p and a draw
from a key that depends only on (seed, index of the token in the output). So a seeded
request gives the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_STOP_IDS = 16            # EOS + stop_token_ids per request that `min_new_tokens` can hold back


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float | None = None
    top_k: int | None = None
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None

    FIELDS = ()   # filled below: the names `SamplingParams.create` accepts

    @classmethod
    def create(cls, **kwargs: Any) -> "SamplingParams":
        """Validated params from keyword arguments; an unknown name is a ValueError naming it."""
        unknown = sorted(set(kwargs) - set(cls.FIELDS))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {', '.join(cls.FIELDS)}")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = (kwargs["stop"],)
        for key in ("stop", "stop_token_ids"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
            else:
                kwargs.pop(key, None)
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.max_new_tokens is None or (is_int(self.max_new_tokens) and self.max_new_tokens >= 0),
             f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        need(is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
             f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        need(self.temperature is None or (is_num(self.temperature) and self.temperature >= 0),
             f"temperature must be a number >= 0, got {self.temperature!r}")
        need(self.top_k is None or (is_int(self.top_k) and self.top_k >= 0),
             f"top_k must be an int >= 0 (0 or None: off), got {self.top_k!r}")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(is_num(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        need(self.seed is None or is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        need(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be ids >= 0, got {self.stop_token_ids!r}")
        need(len(self.stop_token_ids) < MAX_STOP_IDS,
             f"at most {MAX_STOP_IDS - 1} stop_token_ids, got {len(self.stop_token_ids)}")
        need(is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        need(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0),
             f"logprobs must be an int >= 0, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def effective_temperature(self) -> float:
        return 1.0 if self.greedy or self.temperature is None else float(self.temperature)


SamplingParams.FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """What the device needs per sampled row (R rows; `valid` False for padding)."""

    valid: jax.Array             # [R] bool
    slot: jax.Array              # [R] int32: the row's sequence slot (penalty state)
    greedy: jax.Array            # [R] bool
    temperature: jax.Array       # [R] f32 (1.0 for greedy rows)
    top_k: jax.Array             # [R] int32, 0 = off
    top_p: jax.Array             # [R] f32
    repetition_penalty: jax.Array  # [R] f32
    presence_penalty: jax.Array  # [R] f32
    frequency_penalty: jax.Array  # [R] f32
    seed: jax.Array              # [R] uint32
    index: jax.Array             # [R] int32: index of the token being drawn in the output
    hold_back: jax.Array         # [R] bool: still below min_new_tokens
    stop_ids: jax.Array          # [R, MAX_STOP_IDS] int32, -1 padded: masked while hold_back


def row_fields(count: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shapes and dtypes of `Rows` for `count` rows (the runner packs them per step)."""
    shapes = {"stop_ids": (count, MAX_STOP_IDS)}
    dtypes = {"valid": bool, "slot": np.int32, "greedy": bool, "temperature": np.float32, "top_k": np.int32,
              "top_p": np.float32, "repetition_penalty": np.float32, "presence_penalty": np.float32,
              "frequency_penalty": np.float32, "seed": np.uint32, "index": np.int32, "hold_back": bool,
              "stop_ids": np.int32}
    return {name: (shapes.get(name, (count,)), dtypes[name]) for name in dtypes}


# Padding rows: greedy with neutral knobs, no stop ids.
ROW_PADDING = {"greedy": 1, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "stop_ids": -1}


def fill_row(rows: dict[str, np.ndarray], r: int, *, slot: int, params: SamplingParams, seed: int,
             index: int, stop_ids: Sequence[int]) -> None:
    rows["valid"][r] = True
    rows["slot"][r] = slot
    rows["greedy"][r] = params.greedy
    rows["temperature"][r] = params.effective_temperature
    rows["top_k"][r] = params.top_k or 0
    rows["top_p"][r] = params.top_p
    rows["repetition_penalty"][r] = params.repetition_penalty
    rows["presence_penalty"][r] = params.presence_penalty
    rows["frequency_penalty"][r] = params.frequency_penalty
    rows["seed"][r] = seed & 0xFFFFFFFF
    rows["index"][r] = index
    rows["hold_back"][r] = index < params.min_new_tokens
    ids = list(stop_ids)[:MAX_STOP_IDS]
    rows["stop_ids"][r, :len(ids)] = ids


def apply_penalties(logits_RV: jax.Array, rows: Rows, seen_SV: jax.Array, counts_SV: jax.Array) -> jax.Array:
    """HF's repetition penalty over prompt and output tokens, then OpenAI's presence and
    frequency penalties over output tokens, then `min_new_tokens` holding back stop ids."""
    counts = counts_SV[rows.slot].astype(jnp.float32)                      # [R, V]
    seen = seen_SV[rows.slot] | (counts > 0)
    penalty = rows.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits_RV > 0, logits_RV / penalty, logits_RV * penalty), logits_RV)
    logits = logits - rows.presence_penalty[:, None] * (counts > 0) - rows.frequency_penalty[:, None] * counts
    vocab = jnp.arange(logits.shape[-1])
    is_stop = jnp.any(vocab[None, :, None] == rows.stop_ids[:, None, :], axis=-1)
    return jnp.where(rows.hold_back[:, None] & is_stop, -jnp.inf, logits)


def sample(logits_RV: jax.Array, rows: Rows, seen_SV: jax.Array, counts_SV: jax.Array,
           num_logprobs: int) -> dict[str, jax.Array]:
    """Next token per row, its log-prob and the top `num_logprobs` (ids, log-probs).

    Log-probs are of the distribution the token is drawn from before top-k/top-p
    truncation: the penalised logits divided by the temperature (raw for greedy rows),
    which is what an RLHF trainer recomputes.
    """
    logits = apply_penalties(logits_RV.astype(jnp.float32), rows, seen_SV, counts_SV)
    scaled = logits / rows.temperature[:, None]
    logprobs_RV = jax.nn.log_softmax(scaled, axis=-1)

    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (rows.top_k[:, None] == 0) | (rank < rows.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above this rank
    keep &= (before < rows.top_p[:, None]) | (rank == 0)
    truncated = jnp.where(keep, sorted_logits, -jnp.inf)

    keys = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(rows.seed, rows.index)
    drawn_rank = jax.vmap(jax.random.categorical)(keys, truncated)
    drawn = jnp.take_along_axis(order, drawn_rank[:, None], axis=-1)[:, 0]
    token = jnp.where(rows.greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    token_logprob = jnp.take_along_axis(logprobs_RV, token[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs_RV, num_logprobs)
    return {"token": token, "logprob": token_logprob, "top_ids": top_ids.astype(jnp.int32),
            "top_logprobs": top_logprobs}
