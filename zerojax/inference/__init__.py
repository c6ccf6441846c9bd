"""Serving (DeepSpeed-MII / FastGen in JAX): paged KV cache, continuous batching with
Dynamic SplitFuse, one compiled ragged step, per-request sampling.

  kv_cache.py        page pool bookkeeping: free pages, refcounts, prefix hashes
  scheduler.py       admission, the SplitFuse token budget, preemption
  paged_attention.py the ragged paged attention (XLA path; Pallas kernel in zerojax.kernels)
  sampling.py        SamplingParams and the batched device sampler
  runner.py          the compiled step per shape bucket
  engine.py          InferenceEngine: add_request / step / streaming outputs
  sources.py         weights from a checkpoint, a HF directory, an Engine or a module
  tokenizer.py       byte and HF tokenizers, incremental detokenizing
  pipeline.py        `pipeline(src)(prompts, **sampling)`
"""
from zerojax.inference.engine import InferenceEngine, RequestOutput, TokenLogprob
from zerojax.inference.pipeline import Output, Pipeline, pipeline
from zerojax.inference.sampling import SamplingParams

__all__ = ["InferenceEngine", "Output", "Pipeline", "RequestOutput", "SamplingParams", "TokenLogprob", "pipeline"]
