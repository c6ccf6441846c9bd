"""Logical names -> specs, the ZeRO transform on awkward shapes, and the mesh from a config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import zerojax
from zerojax import partition
from zerojax.config import Config, ConfigError
from zerojax.mesh import axis_sizes, build_mesh


def mesh_of(**sizes):
    return build_mesh(Config.load({"train_batch_size": 8, "zerojax": {"mesh": sizes}}))


def test_zero_axes_go_on_the_largest_divisible_dimension():
    mesh = mesh_of(data=8)
    assert partition.add_zero_axes(P(None, None), (12, 40), mesh) == P(None, "data")
    assert partition.add_zero_axes(P(None, None), (64, 16), mesh) == P("data", None)


def test_awkward_shapes_never_fail():
    mesh = mesh_of(data=4, sequence=2)
    # 8 divides nothing; 4 (data alone) divides the second dimension.
    assert partition.add_zero_axes(P(None, None), (10, 4), mesh) == P(None, "data")
    # Nothing divides: stays whole (it is small).
    assert partition.add_zero_axes(P(None), (7,), mesh) == P(None)
    assert partition.add_zero_axes(P(), (), mesh) == P()


def test_zero_axes_compose_with_tensor_axes():
    mesh = mesh_of(data=4, tensor=2)
    # The tensor-sharded dimension is 8/2 = 4 per device; the other is 16: ZeRO takes it.
    assert partition.add_zero_axes(P("tensor", None), (8, 16), mesh) == P("tensor", "data")
    # Only the tensor-sharded dimension divides: both axes land on it.
    assert partition.add_zero_axes(P("tensor", None), (16, 3), mesh) == P(("tensor", "data"), None)


def test_unknown_logical_name_is_an_error():
    with pytest.raises(KeyError, match="'expert'"):
        partition.spec_for(("expert", "embed"), 2)


def test_persistence_threshold_keeps_small_params_whole_at_stage3():
    mesh = mesh_of(data=8)
    params = {"big": jax.ShapeDtypeStruct((64, 64), jnp.float32),
              "small": jax.ShapeDtypeStruct((64,), jnp.float32)}
    logical = {"big": ("embed", "mlp"), "small": ("embed",)}
    layout = partition.make_layout(params, logical, mesh, stage=3, persistence_threshold=100)
    assert layout.params == {"big": P("data", "tensor"), "small": P(None)}
    # Optimizer state of the small param is still partitioned from stage 1.
    assert layout.zero["small"] == P("data")


def test_mesh_sizes_from_deepspeed_keys():
    sizes = axis_sizes(Config.load({"train_batch_size": 8, "tensor_parallel": {"autotp_size": 2}}), 8)
    assert sizes == {"replica": 1, "pipe": 1, "data": 4, "sequence": 1, "tensor": 2}


def test_explicit_mesh_smaller_than_the_machine_uses_the_first_devices():
    mesh = mesh_of(data=2)
    assert mesh.devices.size == 2 and list(mesh.devices.flat) == jax.devices()[:2]


@pytest.mark.parametrize("config, message", [
    ({"zerojax": {"mesh": {"tensor": 3}}}, "cannot be split"),
    ({"zerojax": {"mesh": {"data": 4, "tensor": 4}}}, "only 8 are available"),
    ({"tensor_parallel": {"autotp_size": 2}, "zerojax": {"mesh": {"tensor": 4}}}, "set one of them"),
])
def test_impossible_meshes_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        build_mesh(Config.load({"train_batch_size": 8, **config}))


def test_impossible_batch_is_a_config_error_at_initialize():
    from tests.helpers import PlainMLP
    with pytest.raises(ConfigError, match=r"train_batch_size.*12") as info:
        zerojax.initialize(model_fn=PlainMLP, config={"train_batch_size": 12,
                                                      "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    assert "8" in str(info.value)  # the data-parallel size is shown


def test_unknown_logical_name_in_a_model_fails_at_initialize():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.zeros((8, 8)), out_sharding=("expert", "embed"), eager_sharding=False)

        def __call__(self, batch):
            return jnp.sum(batch["x"] @ self.w[...])

    with pytest.raises(KeyError, match="expert"):
        zerojax.initialize(model_fn=Odd, config={"train_batch_size": 8,
                                                 "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
