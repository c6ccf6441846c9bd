"""`inference.pipeline(src)`: MII's pipeline over the serving engine.

    pipe = inference.pipeline("runs/tiny")          # checkpoint root, HF dir, Engine or module
    outs = pipe(["def main(", "import os"], max_new_tokens=64, temperature=0.0)
    outs[0].generated_text, outs[0].token_ids, outs[0].finish_reason

Prompts are strings (with a tokenizer) or lists of token ids, one or many. With `n > 1`
the result is flat and prompt-major: `n` outputs per prompt, the i-th drawn with seed
`child_seed(seed, i)`. Sampling keywords and their defaults: `sampling.SamplingParams`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from zerojax.inference import sources
from zerojax.inference.engine import InferenceEngine, TokenLogprob, child_seed
from zerojax.inference.sampling import SamplingParams


@dataclasses.dataclass
class Output:
    generated_text: str | None          # without the prompt (MII's return_full_text=False)
    token_ids: list[int]                # the generated ids only
    prompt_length: int
    generated_length: int
    finish_reason: str                  # "stop" | "length"
    prompt: str | list[int]
    logprobs: list[TokenLogprob] | None = None


class Pipeline:
    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def __call__(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], **sampling: Any) -> list[Output]:
        params = SamplingParams.create(**sampling)
        prompts = self._as_list(prompts)
        engine = self.engine
        seed = params.seed if params.seed is not None else int(np.random.default_rng().integers(0, 2 ** 31))
        ids = []
        for prompt in prompts:
            for i in range(params.n):
                child = dataclasses.replace(params, n=1, seed=child_seed(seed, i))
                ids.append(engine.add_request(prompt, child))
        while engine.has_unfinished():
            engine.step()
        outs = []
        for k, request_id in enumerate(ids):
            out = engine.release(request_id)
            outs.append(Output(out.text, out.token_ids, len(out.prompt_token_ids), len(out.token_ids),
                               out.finish_reason, prompts[k // params.n], out.logprobs))
        return outs

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, np.ndarray):
            return [list(map(int, prompts))] if prompts.ndim == 1 else [list(map(int, p)) for p in prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(p, (int, np.integer)) for p in prompts):
            return [prompts]                                     # one prompt of token ids
        return prompts

    def update_params(self, params: Any) -> None:
        """Serve new weights (same model) without recompiling: the hybrid engine's switch."""
        self.engine.set_params(params)


def pipeline(src: Any, *, tensor_parallel: int = 1, page_size: int | None = None, num_pages: int | None = None,
             token_budget: int | None = None, max_seqs: int | None = None, max_context: int | None = None,
             dtype: Any = None, prefix_caching: bool = True, kernels: str = "auto", tag: str | None = None,
             **engine_options) -> Pipeline:
    """A warmed-up pipeline (every step shape compiled) for `src`; see the module docstring.

    `num_pages` counts usable pages of `page_size` tokens (K/V of every layer);
    `max_seqs` defaults to min(64, token_budget); `max_context` to the model's
    `max_position_embeddings`; `dtype=None` keeps the weights' stored dtype; `tag` picks
    a checkpoint of a run other than its `latest`. Other keywords go to `InferenceEngine`
    (`max_logprobs`, `keep_logits`, `warmup`).
    """
    loaded = sources.load(src, tensor_parallel=tensor_parallel, tag=tag)
    engine = InferenceEngine(loaded, page_size=page_size, num_pages=num_pages, token_budget=token_budget,
                             max_seqs=max_seqs, max_context=max_context, dtype=dtype,
                             prefix_caching=prefix_caching, kernels=kernels, **engine_options)
    return Pipeline(engine)
