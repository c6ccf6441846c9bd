"""DeepSpeed's analytic model-state estimators (zerojax.plan): same arguments, same numbers."""
import jax
import pytest
from flax import nnx

import zerojax
from zerojax import plan
from zerojax.models import Llama, LlamaConfig
from tests.helpers import tiny_llama

# Expected values produced by deepspeed 0.19.8's
# deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs for these
# arguments: (total_params, num_gpus_per_node, num_nodes, cpu_offload) -> (cpu_mem, gpu_mem),
# additional_buffer_factor at its default 1.5. 2851598336 is about t5-3b's size.
ZERO2 = [
    ((2851598336, 1, 1, True), (68438360064, 5703196672)),
    ((2851598336, 1, 1, False), (17109590016, 57031966720)),
    ((2851598336, 1, 2, True), (68438360064, 5703196672)),
    ((2851598336, 1, 2, False), (17109590016, 31367581696)),
    ((2851598336, 8, 1, True), (136876720128, 5703196672)),
    ((2851598336, 8, 1, False), (136876720128, 12119292928)),
    ((2851598336, 8, 2, True), (273753440256, 5703196672)),
    ((2851598336, 8, 2, False), (136876720128, 8911244800)),
    ((123456789, 1, 1, True), (2962962936, 246913578)),
    ((123456789, 1, 1, False), (740740734, 2469135780)),
    ((123456789, 1, 2, True), (2962962936, 246913578)),
    ((123456789, 1, 2, False), (740740734, 1358024679)),
    ((123456789, 8, 1, True), (5925925872, 246913578)),
    ((123456789, 8, 1, False), (5925925872, 524691353)),
    ((123456789, 8, 2, True), (11851851744, 246913578)),
    ((123456789, 8, 2, False), (5925925872, 385802465)),
]

# Expected values produced by deepspeed 0.19.8's
# deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs for these arguments:
# (total_params, largest_layer_params, num_gpus_per_node, num_nodes, cpu_offload,
#  cpu_offload_params, zero_init) -> (cpu_mem, gpu_mem, largest_layer_memory),
# additional_buffer_factor at its default 1.5.
ZERO3 = [
    ((123456789, 4567891, 1, 1, True, True, True), (3333333303, 18271564, 18271564)),
    ((123456789, 4567891, 1, 1, True, True, False), (3333333303, 18271564, 18271564)),
    ((123456789, 4567891, 1, 1, True, False, True), (2962962936, 265185142, 18271564)),
    ((123456789, 4567891, 1, 1, True, False, False), (2962962936, 265185142, 18271564)),
    ((123456789, 4567891, 1, 1, False, True, True), (27407346, 2240493766, 18271564)),
    ((123456789, 4567891, 1, 1, False, True, False), (740740734, 2240493766, 18271564)),
    ((123456789, 4567891, 1, 1, False, False, True), (27407346, 2240493766, 18271564)),
    ((123456789, 4567891, 1, 1, False, False, False), (740740734, 2240493766, 18271564)),
    ((123456789, 4567891, 1, 2, True, True, True), (1666666651, 18271564, 18271564)),
    ((123456789, 4567891, 1, 2, True, True, False), (1666666651, 18271564, 18271564)),
    ((123456789, 4567891, 1, 2, True, False, True), (1481481468, 141728353, 18271564)),
    ((123456789, 4567891, 1, 2, True, False, False), (1481481468, 141728353, 18271564)),
    ((123456789, 4567891, 1, 2, False, True, True), (27407346, 1129382665, 18271564)),
    ((123456789, 4567891, 1, 2, False, True, False), (740740734, 1129382665, 18271564)),
    ((123456789, 4567891, 1, 2, False, False, True), (27407346, 1129382665, 18271564)),
    ((123456789, 4567891, 1, 2, False, False, False), (740740734, 1129382665, 18271564)),
    ((123456789, 4567891, 8, 1, True, True, True), (3333333303, 18271564, 18271564)),
    ((123456789, 4567891, 8, 1, True, True, False), (5925925872, 18271564, 18271564)),
    ((123456789, 4567891, 8, 1, True, False, True), (2962962936, 49135761, 18271564)),
    ((123456789, 4567891, 8, 1, True, False, False), (5925925872, 49135761, 18271564)),
    ((123456789, 4567891, 8, 1, False, True, True), (219258768, 296049339, 18271564)),
    ((123456789, 4567891, 8, 1, False, True, False), (5925925872, 296049339, 18271564)),
    ((123456789, 4567891, 8, 1, False, False, True), (219258768, 296049339, 18271564)),
    ((123456789, 4567891, 8, 1, False, False, False), (5925925872, 296049339, 18271564)),
    ((123456789, 4567891, 8, 2, True, True, True), (1666666651, 18271564, 18271564)),
    ((123456789, 4567891, 8, 2, True, True, False), (5925925872, 18271564, 18271564)),
    ((123456789, 4567891, 8, 2, True, False, True), (1481481468, 33703662, 18271564)),
    ((123456789, 4567891, 8, 2, True, False, False), (5925925872, 33703662, 18271564)),
    ((123456789, 4567891, 8, 2, False, True, True), (219258768, 157160451, 18271564)),
    ((123456789, 4567891, 8, 2, False, True, False), (5925925872, 157160451, 18271564)),
    ((123456789, 4567891, 8, 2, False, False, True), (219258768, 157160451, 18271564)),
    ((123456789, 4567891, 8, 2, False, False, False), (5925925872, 157160451, 18271564)),
]


@pytest.mark.parametrize("args, expected", ZERO2)
def test_zero2_matches_deepspeed(args, expected):
    total, gpus, nodes, offload = args
    got = zerojax.estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=nodes,
                                                        cpu_offload=offload)
    assert got == expected
    assert all(type(x) is int for x in got)


@pytest.mark.parametrize("args, expected", ZERO3)
def test_zero3_matches_deepspeed(args, expected):
    total, largest, gpus, nodes, offload, offload_params, zero_init = args
    got = zerojax.estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload,
        cpu_offload_params=offload_params, zero_init=zero_init)
    assert got == expected


def test_defaults_float_counts_and_uneven_nodes_match_deepspeed():
    # Produced by deepspeed 0.19.8's functions for these arguments: float counts (as in
    # DeepSpeed's own examples), three nodes (1/3 is inexact in floating point) and a
    # buffer factor of 1.2; the defaults are DeepSpeed's (1 GPU, 1 node, everything offloaded).
    z2, z3 = zerojax.estimate_zero2_model_states_mem_needs, zerojax.estimate_zero3_model_states_mem_needs
    assert z2(123456789) == (2962962936, 246913578)
    assert z3(123456789, 4567891) == (3333333303, 18271564, 18271564)
    assert z2(2851e6, 4, 3, True, 1.2) == (164217600000, 5702000000)
    assert z2(2851e6, 4, 3, False, 1.2) == (54739200000, 9978500000)
    assert z3(2851e6, 32e6, 4, 3, True, True, False, 1.2) == (54739200000, 128000000, 128000000.0)
    assert z3(2851e6, 32e6, 4, 3, True, False, False, 1.2) == (54739200000, 603166666, 128000000.0)
    assert z3(2851e6, 32e6, 4, 3, False, False, True, 1.2) == (614400000, 4404500000, 128000000.0)


# DeepSpeed 0.19.8's tables for these counts, printed by its `_all_cold` functions, with the
# offload device written as DeepSpeed's documentation shows it ("cpu ", four wide; under
# Python >= 3.11 DeepSpeed prints the enum's name, "OffloadDeviceEnum.cpu", instead).
# 6738415616 / 131072000 are Llama-2-7B's total and largest-layer (embedding) params,
# and these are the lines DeepSpeed prints for the Hugging Face model on 4 GPUs.
LLAMA_7B_ZERO3_4GPU = """\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 1 node, 4 GPUs per node.
SW: Model with 6738M total params, 131M largest layer params.
  per CPU  |  per GPU |   Options
  169.44GB |   0.49GB | offload_param=cpu , offload_optimizer=cpu , zero_init=1
  169.44GB |   0.49GB | offload_param=cpu , offload_optimizer=cpu , zero_init=0
  150.62GB |   3.63GB | offload_param=none, offload_optimizer=cpu , zero_init=1
  150.62GB |   3.63GB | offload_param=none, offload_optimizer=cpu , zero_init=0
    2.93GB |  28.73GB | offload_param=none, offload_optimizer=none, zero_init=1
  150.62GB |  28.73GB | offload_param=none, offload_optimizer=none, zero_init=0
"""
LLAMA_7B_ZERO2_4GPU = (
    "Estimated memory needed for params, optim states and gradients for a:\n"
    "HW: Setup with 1 node, 4 GPUs per node.\n"
    "SW: Model with 6738M total params.\n"
    "  per CPU  |  per GPU |   Options\n"
    "  150.62GB |  12.55GB | offload_optimizer=cpu \n"        # "cpu " padded to four, as "none"
    "  150.62GB |  40.79GB | offload_optimizer=none\n")
TINY_ZERO3_2x8 = """\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 2 nodes, 8 GPUs per node.
SW: Model with 0M total params, 0M largest layer params.
  per CPU  |  per GPU |   Options
    0.00GB |   0.00GB | offload_param=cpu , offload_optimizer=cpu , zero_init=1
    0.00GB |   0.00GB | offload_param=cpu , offload_optimizer=cpu , zero_init=0
    0.00GB |   0.00GB | offload_param=none, offload_optimizer=cpu , zero_init=1
    0.00GB |   0.00GB | offload_param=none, offload_optimizer=cpu , zero_init=0
    0.00GB |   0.00GB | offload_param=none, offload_optimizer=none, zero_init=1
    0.00GB |   0.00GB | offload_param=none, offload_optimizer=none, zero_init=0
"""


def test_all_live_counts_an_nnx_llama_and_prints_deepspeeds_table(capsys):
    model = tiny_llama(nnx.Rngs(0))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    total = sum(leaf.size for leaf in leaves)
    # Largest layer: one layer's slice of a stacked param (gate/up/down: hidden x intermediate),
    # larger than the embedding and the LM head (vocab x hidden).
    cfg = model.cfg
    largest = cfg.hidden_size * cfg.intermediate_size
    assert largest > cfg.vocab_size * cfg.hidden_size
    assert plan.param_counts(model) == (total, largest)
    # The same counts from the param state, its pure dict, and ShapeDtypeStructs.
    state = nnx.state(model, nnx.Param)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    for tree in (state, nnx.to_pure_dict(state), abstract, nnx.state(model)):
        assert plan.param_counts(tree) == (total, largest)

    zerojax.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=2)
    assert capsys.readouterr().out == TINY_ZERO3_2x8

    # An abstract Llama-2-7B (nothing allocated) counts as DeepSpeed counts the Hugging Face one.
    llama_7b = nnx.eval_shape(lambda: Llama(LlamaConfig(), rngs=nnx.Rngs(0)))
    assert plan.param_counts(llama_7b) == (6738415616, 131072000)
    zerojax.estimate_zero3_model_states_mem_needs_all_live(llama_7b, num_gpus_per_node=4)
    assert capsys.readouterr().out == LLAMA_7B_ZERO3_4GPU
    zerojax.estimate_zero2_model_states_mem_needs_all_live(llama_7b, num_gpus_per_node=4)
    assert capsys.readouterr().out == LLAMA_7B_ZERO2_4GPU
    zerojax.estimate_zero3_model_states_mem_needs_all_cold(6738415616, 131072000, num_gpus_per_node=4)
    assert capsys.readouterr().out == LLAMA_7B_ZERO3_4GPU


@pytest.mark.parametrize("call, name", [
    (lambda: zerojax.estimate_zero2_model_states_mem_needs(0), "total_params"),
    (lambda: zerojax.estimate_zero2_model_states_mem_needs(-5), "total_params"),
    (lambda: zerojax.estimate_zero2_model_states_mem_needs(float("nan")), "total_params"),
    (lambda: zerojax.estimate_zero2_model_states_mem_needs(100, num_gpus_per_node=0), "num_gpus_per_node"),
    (lambda: zerojax.estimate_zero2_model_states_mem_needs(100, num_nodes=0), "num_nodes"),
    (lambda: zerojax.estimate_zero2_model_states_mem_needs(100, additional_buffer_factor=0),
     "additional_buffer_factor"),
    (lambda: zerojax.estimate_zero2_model_states_mem_needs_all_cold(0), "total_params"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs(0, 0), "total_params"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs(100, 10, num_gpus_per_node=0), "num_gpus_per_node"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs(100, 10, num_gpus_per_node=1.5), "num_gpus_per_node"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs(100, -1), "largest_layer_params"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs(100, 200), "largest_layer_params"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs_all_cold(-1, 0), "total_params"),
    (lambda: zerojax.estimate_zero3_model_states_mem_needs_all_live(tiny_llama(nnx.Rngs(0)),
                                                                    num_gpus_per_node=0), "num_gpus_per_node"),
])
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_all_live_refuses_a_model_without_params():
    with pytest.raises(ValueError, match="no params"):
        zerojax.estimate_zero2_model_states_mem_needs_all_live({})
