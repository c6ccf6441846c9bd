"""Tensor (Megatron layout via the rules table) and sequence (Ulysses, ring) parallelism, composed with ZeRO."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import zerojax
from zerojax.config import ConfigError
from zerojax.models import Llama, LlamaConfig
from tests.helpers import token_batches

# 8 heads, 4 K/V heads: tensor 8 exercises Megatron's K/V replication. Vocab 96 is a size no
# other dimension has, so an all-gather of full-vocab logits would be visible in the HLO.
TP_LLAMA = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32)
ROWS, STEPS = 8, 3


def tp_llama(rngs):
    return Llama(TP_LLAMA, rngs=rngs)


def config(stage=0, tensor=1, sequence=1, strategy="ulysses", **extra):
    return {"train_batch_size": ROWS, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "tensor_parallel": {"autotp_size": tensor}, "sequence_parallel_size": sequence,
            "zerojax": {"sequence_parallel": {"strategy": strategy}}, **extra}


def losses(engine, batches):
    return np.array([float(engine.train_step(b)["loss"]) for b in batches])


@pytest.fixture(scope="module")
def batches():
    return token_batches(STEPS, ROWS, vocab=96)


@pytest.fixture(scope="module")
def data_parallel(batches):
    return losses(zerojax.initialize(model_fn=tp_llama, config=config()), batches)


# Every tensor size and both ways params are stored (whole, ZeRO-3 shards); tensor 8 is
# also the K/V-replication case.
@pytest.mark.parametrize("tensor, stage", [(2, 3), (4, 0), (8, 3)])
def test_tensor_parallel_matches_data_parallel(tensor, stage, batches, data_parallel):
    engine = zerojax.initialize(model_fn=tp_llama, config=config(stage, tensor))
    assert engine.mesh.shape["tensor"] == tensor and engine.mesh.shape["data"] == 8 // tensor
    np.testing.assert_allclose(losses(engine, batches), data_parallel, atol=1e-4, rtol=0)


def test_tensor_parallel_really_splits_the_big_matrices():
    engine = zerojax.initialize(model_fn=tp_llama, config=config(0, 4))
    params = engine.state.params
    for name in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        array = params["layers"][name]
        assert array.addressable_shards[0].data.size == array.size // 4, name
    for array in (params["embed_tokens"], params["lm_head"]):        # vocab-parallel
        assert array.addressable_shards[0].data.size == array.size // 4
    # 4 K/V heads over tensor 4: split; the norms stay whole.
    assert params["layers"]["k_proj"].addressable_shards[0].data.size == params["layers"]["k_proj"].size // 4
    assert params["norm"].addressable_shards[0].data.size == params["norm"].size


def test_kv_heads_are_replicated_when_fewer_than_tensor_ranks():
    engine = zerojax.initialize(model_fn=tp_llama, config=config(0, 8))
    k_proj = engine.state.params["layers"]["k_proj"]
    assert k_proj.addressable_shards[0].data.size == k_proj.size      # 4 K/V heads, 8 ranks
    assert engine.rules["kv_heads"] is None and engine.rules["heads"] == "tensor"


def test_vocab_parallel_loss_never_gathers_full_vocab_logits():
    engine = zerojax.initialize(model_fn=tp_llama, config=config(0, 8), abstract=True,
                                example_batch={"input_ids": np.zeros((ROWS, 16), np.int32)})
    hlo = engine.lower_train_step().compile().as_text()
    gathers = [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)]
    shapes = [re.search(r"= \w+\[([\d,]*)\]", line).group(1).split(",") for line in gathers]
    assert not [s for s in shapes if "96" in s], gathers


@pytest.mark.parametrize("overrides, message", [
    ({"tensor_parallel": {"autotp_size": 8}}, r"'heads' dimension is 6.*\[1, 2, 3, 6\]"),
    ({"tensor_parallel": {"autotp_size": 3}}, "cannot be split"),
])
def test_impossible_tensor_layouts_are_config_errors(overrides, message):
    six_heads = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(ConfigError, match=message):
        zerojax.initialize(model_fn=lambda r: Llama(six_heads, rngs=r), config={**config(), **overrides})


@pytest.mark.slow
def test_checkpoint_saved_under_tensor_parallel_loads_plain_and_back(tmp_path, batches):
    tp = zerojax.initialize(model_fn=tp_llama, config=config(3, 4))
    tp.train_step(batches[0])
    tp.save_checkpoint(str(tmp_path / "tp"))
    plain = zerojax.initialize(model_fn=tp_llama, config=config(0))
    plain.load_checkpoint(str(tmp_path / "tp"))
    # A restore returns the saved bytes, whatever the layout: an identity, bitwise.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, plain.state.params),
                 jax.tree.map(np.asarray, tp.state.params))
    plain.save_checkpoint(str(tmp_path / "plain"))
    back = zerojax.initialize(model_fn=tp_llama, config=config(1, 8))
    back.load_checkpoint(str(tmp_path / "plain"))
    a, b = float(back.train_step(batches[1])["loss"]), float(tp.train_step(batches[1])["loss"])
    assert abs(a - b) <= 1e-4


# Sequence size 2 of both strategies runs in test_tensor_2_sequence_2_zero3 below.
@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
@pytest.mark.parametrize("sequence", [4])
def test_sequence_parallel_matches_data_parallel(sequence, strategy, batches, data_parallel):
    engine = zerojax.initialize(model_fn=tp_llama, config=config(0, 1, sequence, strategy))
    assert engine.mesh.shape["sequence"] == sequence and engine.mesh.shape["data"] == 8 // sequence
    np.testing.assert_allclose(losses(engine, batches), data_parallel, atol=1e-4, rtol=0)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_tensor_2_sequence_2_zero3(strategy, batches, data_parallel):
    engine = zerojax.initialize(model_fn=tp_llama, config=config(3, 2, 2, strategy))
    assert (engine.mesh.shape["data"], engine.mesh.shape["sequence"], engine.mesh.shape["tensor"]) == (2, 2, 2)
    np.testing.assert_allclose(losses(engine, batches), data_parallel, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sequence_parallel_shrinks_activation_memory():
    """At a fixed number of rows per data rank: (data 2, sequence s) on 2s devices."""
    long_llama = LlamaConfig(**{**TP_LLAMA.__dict__, "max_position_embeddings": 512})

    def temp(strategy, **mesh):
        engine = zerojax.initialize(
            model_fn=lambda r: Llama(long_llama, rngs=r), abstract=True,
            config={**config(), "train_batch_size": 4,
                    "zerojax": {"mesh": mesh, "sequence_parallel": {"strategy": strategy}}},
            example_batch={"input_ids": np.zeros((4, 512), np.int32)})
        return engine.memory_report()["temp"]

    plain = temp("ring", data=2)
    ring2, ring4 = temp("ring", data=2, sequence=2), temp("ring", data=2, sequence=4)
    assert ring4 < ring2 < plain and ring4 < plain / 4
    assert temp("ulysses", data=2, sequence=4) < plain / 2


def test_sequence_parallel_collectives_in_the_compiled_step():
    def hlo(strategy):
        engine = zerojax.initialize(model_fn=tp_llama, config=config(0, 1, 4, strategy), abstract=True,
                                    example_batch={"input_ids": np.zeros((ROWS, 16), np.int32)})
        return engine.lower_train_step().compile().as_text()

    ulysses, ring = hlo("ulysses"), hlo("ring")
    assert re.search(r"all-to-all(-start)?\(", ulysses)
    assert re.search(r"collective-permute(-start)?\(", ring)
    # Rows stay on their data ranks: no all-gather of activations around the attention.
    assert not re.search(r"all-gather(-start)?\(", ulysses + ring)


def test_impossible_sequence_layouts_are_config_errors(batches):
    with pytest.raises(ConfigError, match=r"length 15.*sequence-parallel size 2"):
        zerojax.initialize(model_fn=tp_llama, config=config(0, 1, 2)).train_step(
            {"input_ids": np.zeros((ROWS, 15), np.int32)})
    six_heads = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(ConfigError, match=r"6 attention heads.*sequence size 4.*ring"):
        zerojax.initialize(model_fn=lambda r: Llama(six_heads, rngs=r), config=config(0, 1, 4, "ulysses"))
    zerojax.initialize(model_fn=lambda r: Llama(six_heads, rngs=r), config=config(0, 1, 4, "ring"))
