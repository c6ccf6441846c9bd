"""Per-tensor remat policies (`"zerojax": {"remat": {...}}`) and DeepSpeed's cpu_checkpointing.

What the backward pass keeps is decided at trace time, so the tests read the saved
residuals (`jax.ad_checkpoint.print_saved_residuals`): which activations are kept, and
which are kept in host memory (`<host>` types). On CPU XLA then elides the host copies,
so memory savings are measured on a GPU; numerics must not change.
"""
from __future__ import annotations

import contextlib
import io

import jax
import numpy as np
import pytest
from flax import nnx

import zerojax
from tests.helpers import TINY_LLAMA, relative_error, tiny_llama, token_batches
from zerojax import compute
from zerojax.config import REMAT_NAMES, Config, ConfigError, RematPolicy

LAYERS = TINY_LLAMA.num_hidden_layers
ROWS = 3


def saved_residuals(remat) -> list[str]:
    """The residuals a tiny Llama's loss keeps for its backward pass under `remat`."""
    graphdef, params, rest = nnx.split(tiny_llama(nnx.Rngs(0)), nnx.Param, ...)
    batch = token_batches(1, ROWS)[0]

    def loss(params):
        with compute.use(compute.ComputePolicy(remat=remat)):
            return nnx.merge(graphdef, params, rest)(batch)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    return out.getvalue().splitlines()


def scan_outputs(lines: list[str]) -> list[str]:
    """Residuals stacked over the layers by the layer scan: what each layer keeps."""
    shapes = [line.split(" ", 1)[0] for line in lines if "output of scan" in line]
    return [s for s in shapes if s.split("[", 1)[1].startswith(f"{LAYERS},{ROWS},")]


@pytest.fixture(scope="module")
def residuals():
    cases = {"full": "full", "none": "none",
             "offload_input": RematPolicy("full", offload=("layer_input",)),
             "save_hidden": RematPolicy("full", save=("mlp_hidden",)),
             "minimal_but_recompute_attention_out": RematPolicy("minimal", remat=("attention_out",))}
    return {k: scan_outputs(saved_residuals(v)) for k, v in cases.items()}


def test_full_remat_keeps_only_each_layers_input(residuals):
    assert residuals["full"] == [f"f32[{LAYERS},3,16,64]"]


def test_offloaded_layer_input_is_kept_in_host_memory(residuals):
    assert residuals["offload_input"] == [f"f32<host>[{LAYERS},3,16,64]"]


def test_saved_tensor_is_kept_besides_the_full_remat(residuals):
    # The MLP's activated hidden [layers, rows, seq, intermediate] is kept too.
    assert sorted(residuals["save_hidden"]) == sorted(residuals["full"] + [f"f32[{LAYERS},3,16,128]"])


def test_minimal_keeps_the_named_matmul_outputs_and_named_recompute_wins(residuals):
    minimal = scan_outputs(saved_residuals(RematPolicy("minimal")))
    per_layer = lambda *tail: f"f32[{LAYERS},{ROWS},16,{','.join(map(str, tail))}]"
    # layer input, q (4 heads) and k, v (2 KV heads), o-projection, gate and up.
    assert sorted(minimal) == sorted([per_layer(64), per_layer(4, 16), per_layer(2, 16), per_layer(2, 16),
                                      per_layer(64), per_layer(128), per_layer(128)])
    without = list(minimal)
    without.remove(per_layer(64))                        # the o-projection is recomputed instead
    assert sorted(residuals["minimal_but_recompute_attention_out"]) == sorted(without)
    assert len(residuals["none"]) > len(minimal) > len(residuals["full"])


def test_every_name_is_a_tensor_of_the_reference_layers():
    jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(*p)(token_batches(1, 2)[0]))(
        nnx.split(tiny_llama(nnx.Rngs(0)))))
    for name in REMAT_NAMES:
        assert f"name={name}" in jaxpr


def config(**extra) -> dict:
    return {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
            "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, **extra}


def test_policies_train_the_same_model():
    batches = token_batches(2, 8)
    runs = {}
    for key, extra in {
        "none": {"zerojax": {"remat": "none"}},
        "policy": {"zerojax": {"remat": {"policy": "full", "save": ["mlp_hidden"],
                                          "offload": ["attention"], "remat": ["query"]}}},
        "cpu_checkpointing": {"activation_checkpointing": {"partition_activations": False,
                                                           "cpu_checkpointing": True}},
    }.items():
        engine = zerojax.initialize(model_fn=tiny_llama, config=config(**extra))
        runs[key] = (engine, [float(engine.train_step(b)["loss"]) for b in batches])
    assert runs["cpu_checkpointing"][0].policy.remat == RematPolicy("full", offload=("layer_input",))
    for key in ("policy", "cpu_checkpointing"):
        np.testing.assert_allclose(runs[key][1], runs["none"][1], atol=2e-5, rtol=0)
        assert relative_error(runs[key][0].state.params, runs["none"][0].state.params) <= 1e-5


def test_config_remat_policy_parses_and_round_trips():
    cfg = Config.load({"zerojax": {"remat": {"policy": "minimal", "save": ["mlp_hidden"],
                                             "offload": ["layer_input", "attention"]}}})
    assert cfg.zerojax.remat == RematPolicy("minimal", save=("mlp_hidden",),
                                            offload=("layer_input", "attention"))
    assert Config.load(cfg.to_dict()).zerojax.remat == cfg.zerojax.remat
    assert Config.load({"zerojax": {"remat": {}}}).zerojax.remat == RematPolicy()
    assert Config.load({"zerojax": {"remat": "minimal"}}).zerojax.remat == "minimal"


@pytest.mark.parametrize("remat, message", [
    ({"offload": ["mlp_hiden"]}, r"zerojax\.remat\.offload: unknown tensor name 'mlp_hiden' "
                                 r"\(did you mean 'mlp_hidden'\?\)"),
    ({"save": ["query"], "remat": ["query"]}, r"'query' is in both 'save' and 'remat'"),
    ({"policy": "some"}, r"zerojax\.remat\.policy: expected one of 'full', 'minimal', 'none'"),
    ({"save": "query"}, r"zerojax\.remat\.save: expected a list of tensor names"),
    ({"saved": []}, r"did you mean 'zerojax\.remat\.save'"),
    ({"policy": "none", "remat": ["query"]}, r'policy "none" keeps every activation.*\(query\)'),
    ("partial", r"zerojax\.remat: expected one of 'auto', 'full', 'minimal', 'none'"),
])
def test_config_bad_remat_is_an_error(remat, message):
    with pytest.raises(ConfigError, match=message):
        Config.load({"zerojax": {"remat": remat}})


def user_residuals(remat: str) -> list[str]:
    """What a user's module (tests.helpers.PlainMLP: no zerojax calls) keeps for the backward
    pass under the engine's step with `remat`."""
    import functools

    from tests.helpers import PlainMLP, mlp_batches
    from zerojax.step import model_loss
    engine = zerojax.initialize(model_fn=PlainMLP, config={**config(), "zerojax": {"remat": remat}},
                                abstract=True)
    spec = engine.step_spec
    batch = mlp_batches(1, 8)[0]
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), engine._abstract_params)
    rest = nnx.to_pure_dict(nnx.split(PlainMLP(nnx.Rngs(0)), nnx.Param, ...)[2])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: functools.partial(model_loss, spec)(p, rest, batch)[0], params)
    inputs = ("from the argument", "from a constant")          # params, the batch
    return [line for line in out.getvalue().splitlines() if not any(i in line for i in inputs)]


def test_a_user_modules_loss_keeps_only_matmul_outputs_under_minimal():
    kept = user_residuals("minimal")
    assert kept and all("dot_general" in line for line in kept), kept
    # "auto" leaves a user's module as it is: no measured win (benchmarks/NOTES.md).
    assert user_residuals("auto") == user_residuals("none")
    # Without remat the element-wise intermediates (GELU's) are kept too.
    plain = user_residuals("none")
    assert len(plain) > len(kept) and any("dot_general" not in line for line in plain)
