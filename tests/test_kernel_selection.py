"""The reference models with Pallas kernels compute what they compute with XLA's ops."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import zerojax
from zerojax import kernels
from zerojax.models import GPT2, GPT2Config, Llama, LlamaConfig
from tests.helpers import token_batches

LLAMA = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32)
GPT = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32)


def losses(model_fn, kernel_mode, stage=3, tensor=1, steps=3):
    config = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "tensor_parallel": {"autotp_size": tensor}, "zerojax": {"kernels": kernel_mode}}
    engine = zerojax.initialize(model_fn=model_fn, config=config)
    assert engine.policy.kernels == kernel_mode
    return np.array([float(engine.train_step(b)["loss"]) for b in token_batches(steps, 8)])


@pytest.mark.slow
@pytest.mark.parametrize("name, model_fn", [("llama", lambda r: Llama(LLAMA, rngs=r)),
                                            ("gpt2", lambda r: GPT2(GPT, rngs=r))])
def test_pallas_kernels_match_xla_with_zero3_on_8_devices(name, model_fn):
    np.testing.assert_allclose(losses(model_fn, "pallas"), losses(model_fn, "xla"), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_pallas_kernels_compose_with_tensor_parallelism():
    """Tensor 4 with 2 K/V heads: query heads split, K/V replicated and sliced per rank."""
    model_fn = lambda r: Llama(LLAMA, rngs=r)
    np.testing.assert_allclose(losses(model_fn, "pallas", stage=0, tensor=4, steps=2),
                               losses(model_fn, "xla", stage=0, tensor=4, steps=2), atol=1e-4, rtol=0)


def test_the_step_really_calls_the_kernels():
    engine = zerojax.initialize(model_fn=lambda r: Llama(LLAMA, rngs=r), config={
        "train_batch_size": 8, "optimizer": {"type": "AdamW"}, "zerojax": {"kernels": "pallas"}})
    jaxpr = str(jax.make_jaxpr(engine._train_step)(engine.state, engine.shard_batch(token_batches(1, 8)[0])))
    assert jaxpr.count("pallas_call") >= 6       # attention, norms and loss, forward and backward


def test_auto_is_xla_on_cpu_and_pallas_on_gpu(monkeypatch):
    assert kernels.resolve("auto") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernels.resolve("auto") == "pallas"
    assert kernels.resolve("xla") == "xla"
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.resolve("triton")
