"""Reference models: param metadata, math against a plain-jnp reference, scan, precision, remat."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zerojax import compute
from zerojax.models.layers import activation
from zerojax.models import GPT2, GPT2Config, Llama, LlamaConfig, build, make_config

PARAM_AXES = {"layers", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "positions"}

LLAMA_GQA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)
LLAMA_TIED = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=None, head_dim=8, rope_theta=10000.0,
                  tie_word_embeddings=True)
GPT2_TINY = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32)

B, T = 2, 16


# ----------------------------------------------------------------------------- helpers

def make_llama(seed=0, randomized=False, **overrides):
    model = Llama(LlamaConfig(**{**LLAMA_GQA, **overrides}), rngs=nnx.Rngs(seed))
    return randomize(model) if randomized else model


def make_gpt2(seed=0, randomized=False, **overrides):
    model = GPT2(GPT2Config(**{**GPT2_TINY, **overrides}), rngs=nnx.Rngs(seed))
    return randomize(model) if randomized else model


def randomize(model, seed=1):
    """Move every param off its init (biases nonzero, norm scales off one) so wiring shows."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def pure_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def token_batch(vocab, seed=2, b=B, t=T):
    ids = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, dtype=jnp.int32)
    return {"input_ids": ids}


def jitted(model, method="__call__"):
    """A fresh jitted pure function of (state, x) calling `model.<method>(x)`."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, x: getattr(nnx.merge(graphdef, st), method)(x))
    return lambda x: fn(state, x)


def loss_and_grads(model, batch):
    graphdef, state = nnx.split(model)
    fn = jax.jit(jax.value_and_grad(lambda st: nnx.merge(graphdef, st)(batch)))
    return fn(state)


# ----------------------------------------------------------------------------- plain reference

def ref_loss(logits, input_ids, labels=None, loss_mask=None):
    targets = (labels if labels is not None else input_ids)[:, 1:]
    mask = targets != -100
    if loss_mask is not None:
        mask = mask & (loss_mask[:, 1:] != 0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return -(picked * mask).sum() / mask.sum()


def ref_in_proj(x, w_DHK, b_HK=None):
    """x @ W with W flattened to a [D, H * hd] matrix, as a Hugging Face projection."""
    y = x @ w_DHK.reshape(w_DHK.shape[0], -1)
    return y if b_HK is None else y + b_HK.reshape(-1)


def ref_causal_attention(q, k, v):
    """[B, T, H, hd] with K/V heads repeated HF-style (repeat_kv) to H."""
    n_rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, n_rep, axis=2)
    v = jnp.repeat(v, n_rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    t = q.shape[1]
    causal = np.tril(np.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def ref_rope(x, theta):
    hd, t = x.shape[-1], x.shape[1]
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    freqs = np.outer(np.arange(t, dtype=np.float32), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def ref_rmsnorm(x, w, eps):
    return w * (x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def ref_llama_logits(P, cfg, ids):
    b, t = ids.shape
    H, G, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = P["embed_tokens"][ids]
    for i in range(cfg.num_hidden_layers):
        lp = {name: value[i] for name, value in P["layers"].items()}
        h = ref_rmsnorm(x, lp["input_layernorm"], cfg.rms_norm_eps)
        q = ref_in_proj(h, lp["q_proj"]).reshape(b, t, H, hd)
        k = ref_in_proj(h, lp["k_proj"]).reshape(b, t, G, hd)
        v = ref_in_proj(h, lp["v_proj"]).reshape(b, t, G, hd)
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
        attn = ref_causal_attention(q, k, v).reshape(b, t, H * hd)
        x = x + attn @ lp["o_proj"].reshape(H * hd, -1)
        h = ref_rmsnorm(x, lp["post_attention_layernorm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ lp["gate_proj"]) * (h @ lp["up_proj"])) @ lp["down_proj"]
    x = ref_rmsnorm(x, P["norm"], cfg.rms_norm_eps)
    head = P["embed_tokens"].T if cfg.tie_word_embeddings else P["lm_head"]
    return x @ head


def ref_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * w + b


def ref_gelu_new(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_gpt2_logits(P, cfg, ids):
    b, t = ids.shape
    H, hd = cfg.n_head, cfg.head_dim
    x = P["wte"][ids] + P["wpe"][:t][None]
    for i in range(cfg.n_layer):
        lp = {name: value[i] for name, value in P["layers"].items()}
        h = ref_layernorm(x, lp["ln_1_scale"], lp["ln_1_bias"], cfg.layer_norm_epsilon)
        q = ref_in_proj(h, lp["q_proj"], lp["q_bias"]).reshape(b, t, H, hd)
        k = ref_in_proj(h, lp["k_proj"], lp["k_bias"]).reshape(b, t, H, hd)
        v = ref_in_proj(h, lp["v_proj"], lp["v_bias"]).reshape(b, t, H, hd)
        attn = ref_causal_attention(q, k, v).reshape(b, t, H * hd)
        x = x + attn @ lp["attn_proj"].reshape(H * hd, -1) + lp["attn_proj_bias"]
        h = ref_layernorm(x, lp["ln_2_scale"], lp["ln_2_bias"], cfg.layer_norm_epsilon)
        m = ref_gelu_new(h @ lp["c_fc"] + lp["c_fc_bias"])
        x = x + m @ lp["c_proj"] + lp["c_proj_bias"]
    x = ref_layernorm(x, P["ln_f_scale"], P["ln_f_bias"], cfg.layer_norm_epsilon)
    return x @ P["wte"].T


# ----------------------------------------------------------------------------- param tree

LLAMA_LAYER_NAMES = {"input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                     "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"}
GPT2_LAYER_NAMES = {"ln_1_scale", "ln_1_bias", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias",
                    "v_bias", "attn_proj", "attn_proj_bias", "ln_2_scale", "ln_2_bias", "c_fc",
                    "c_fc_bias", "c_proj", "c_proj_bias"}


@pytest.mark.parametrize("make, top", [
    (lambda: Llama(LlamaConfig(**LLAMA_GQA), rngs=nnx.Rngs(0)), {"embed_tokens", "norm", "lm_head"}),
    (lambda: Llama(LlamaConfig(**LLAMA_TIED), rngs=nnx.Rngs(0)), {"embed_tokens", "norm"}),
    (lambda: GPT2(GPT2Config(**GPT2_TINY), rngs=nnx.Rngs(0)), {"wte", "wpe", "ln_f_scale", "ln_f_bias"}),
], ids=["llama", "llama_tied", "gpt2"])
def test_params_carry_logical_axes(make, top):
    model = nnx.eval_shape(make)
    seen = set()
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        seen.add(path)
        axes = var.get_metadata()["out_sharding"]
        assert isinstance(axes, tuple) and len(axes) == var.ndim, (path, axes, var.shape)
        assert set(axes) <= PARAM_AXES, (path, axes)
        assert var.dtype == jnp.float32
        if path[0] == "layers":
            assert axes[0] == "layers" and var.shape[0] == 2, path
    layer_names = LLAMA_LAYER_NAMES if isinstance(model, Llama) else GPT2_LAYER_NAMES
    assert seen == {(n,) for n in top} | {("layers", n) for n in layer_names}


def test_llama_param_shapes_and_init():
    model = make_llama()
    P = pure_params(model)
    L, D, H, G, K, F, V = 2, 32, 4, 2, 8, 64, 128
    shapes = {"q_proj": (L, D, H, K), "k_proj": (L, D, G, K), "v_proj": (L, D, G, K),
              "o_proj": (L, H, K, D), "gate_proj": (L, D, F), "up_proj": (L, D, F),
              "down_proj": (L, F, D), "input_layernorm": (L, D), "post_attention_layernorm": (L, D)}
    assert {k: v.shape for k, v in P["layers"].items()} == shapes
    assert P["embed_tokens"].shape == (V, D) and P["lm_head"].shape == (D, V)
    np.testing.assert_array_equal(P["norm"], 1.0)
    np.testing.assert_array_equal(P["layers"]["input_layernorm"], 1.0)
    assert abs(float(jnp.std(P["layers"]["gate_proj"])) - 0.02) < 0.003
    assert not np.allclose(P["layers"]["q_proj"][0], P["layers"]["q_proj"][1])


def test_gpt2_init_scales_output_projections():
    model = make_gpt2(n_embd=64, n_layer=8, n_head=4)
    P = pure_params(model)
    assert abs(float(jnp.std(P["layers"]["c_fc"])) - 0.02) < 0.002
    for name in ("attn_proj", "c_proj"):
        assert abs(float(jnp.std(P["layers"][name])) - 0.02 / 4.0) < 0.0006, name
    for name in ("q_bias", "attn_proj_bias", "c_fc_bias", "c_proj_bias", "ln_1_bias"):
        np.testing.assert_array_equal(P["layers"][name], 0.0)
    np.testing.assert_array_equal(P["ln_f_scale"], 1.0)


# ----------------------------------------------------------------------------- math

@pytest.mark.parametrize("kwargs", [LLAMA_GQA, LLAMA_TIED], ids=["gqa", "tied_mha_head_dim"])
def test_llama_matches_reference(kwargs):
    model = make_llama(randomized=True, **kwargs)
    cfg = model.cfg
    P = pure_params(model)
    batch = token_batch(cfg.vocab_size)
    ids = batch["input_ids"]
    ref_logits = jax.jit(ref_llama_logits, static_argnums=1)(P, cfg, ids)

    logits = jitted(model, "logits")(ids)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    loss = jitted(model)(batch)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref_loss(ref_logits, ids), atol=1e-5, rtol=1e-5)


def test_gpt2_matches_reference():
    model = make_gpt2(randomized=True)
    cfg = model.cfg
    P = pure_params(model)
    batch = token_batch(cfg.vocab_size)
    ids = batch["input_ids"]
    ref_logits = jax.jit(ref_gpt2_logits, static_argnums=1)(P, cfg, ids)

    np.testing.assert_allclose(jitted(model, "logits")(ids), ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jitted(model)(batch), ref_loss(ref_logits, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, ref", [(make_llama, ref_llama_logits), (make_gpt2, ref_gpt2_logits)],
                         ids=["llama", "gpt2"])
def test_labels_and_loss_mask(make, ref):
    model = make(randomized=True)
    cfg = model.cfg
    ids = token_batch(cfg.vocab_size)["input_ids"]
    ref_logits = jax.jit(ref, static_argnums=1)(pure_params(model), cfg, ids)
    rng = np.random.default_rng(0)
    labels = np.asarray(rng.integers(0, cfg.vocab_size, ids.shape), np.int32)
    labels[:, : T // 2] = -100
    loss_mask = np.asarray(rng.integers(0, 2, ids.shape), np.int32)
    loss_fn = jitted(model)

    for batch, expect in [
        ({"input_ids": ids, "labels": labels}, ref_loss(ref_logits, ids, labels=labels)),
        ({"input_ids": ids, "loss_mask": loss_mask}, ref_loss(ref_logits, ids, loss_mask=loss_mask)),
        ({"input_ids": ids, "labels": labels, "loss_mask": loss_mask},
         ref_loss(ref_logits, ids, labels=labels, loss_mask=loss_mask)),
    ]:
        np.testing.assert_allclose(loss_fn(batch), expect, atol=1e-5, rtol=1e-5)
    # Nothing to predict: zero, not NaN.
    nothing = {"input_ids": ids, "labels": np.full(ids.shape, -100, np.int32)}
    assert float(loss_fn(nothing)) == 0.0


def test_batch_is_checked():
    model = make_llama()
    ids = token_batch(128)["input_ids"]
    with pytest.raises(ValueError, match="attention_mask"):
        model({"input_ids": ids, "attention_mask": jnp.ones_like(ids)})
    with pytest.raises(ValueError, match="labels"):
        model({"input_ids": ids, "labels": ids[:, :-1]})
    with pytest.raises(ValueError, match="n_positions"):
        make_gpt2().logits(jnp.zeros((1, 33), jnp.int32))


# ----------------------------------------------------------------------------- compiled program

def test_hlo_size_does_not_grow_with_depth():
    batch = {"input_ids": jax.ShapeDtypeStruct((B, T), jnp.int32)}

    def hlo_chars(num_layers):
        cfg = LlamaConfig(**{**LLAMA_GQA, "num_hidden_layers": num_layers})
        model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        loss = jax.jit(jax.value_and_grad(lambda st, b: nnx.merge(graphdef, st)(b)))
        return len(loss.lower(state, batch).as_text())

    two, six = hlo_chars(2), hlo_chars(6)
    assert abs(six - two) / two < 0.10, (two, six)


# ----------------------------------------------------------------------------- precision, remat

@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_bf16_policy(make):
    model = make(randomized=True)
    batch = token_batch(model.cfg.vocab_size)
    loss32 = jitted(model)(batch)
    with compute.use(compute.ComputePolicy(dtype=jnp.bfloat16)):
        logits16 = jitted(model, "logits")(batch["input_ids"])
        loss16, grads = loss_and_grads(model, batch)
    assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
    assert loss16.dtype == jnp.float32
    assert abs(float(loss16) - float(loss32)) < 2e-2, (float(loss16), float(loss32))
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert g.shape == p.shape and g.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(g)))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.fixture(scope="module")
def llama_fp32():
    """A randomized GQA Llama, a batch, and its fp32 loss and grads (default policy)."""
    model = make_llama(randomized=True)
    batch = token_batch(128)
    loss, grads = loss_and_grads(model, batch)
    return model, batch, loss, grads


@pytest.mark.parametrize("mode", ["full", "minimal"])
def test_remat_matches_none(llama_fp32, mode):
    model, batch, loss_none, grads_none = llama_fp32
    with compute.use(compute.ComputePolicy(remat=mode)):
        loss_remat, grads_remat = loss_and_grads(model, batch)
    np.testing.assert_allclose(loss_remat, loss_none, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads_none)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,reference", [
    ("gelu_new", lambda x: jax.nn.gelu(x, approximate=True)),
    ("gelu", lambda x: jax.nn.gelu(x, approximate=False)),
    ("silu", jax.nn.silu),
])
def test_activation_backward_keeps_only_its_input(name, reference):
    """Plain autodiff of tanh-GELU keeps ~6 tensors of the MLP's widest shape per layer;
    ours keeps the input alone and gives the same gradient."""
    act = activation(name)
    x = jnp.linspace(-6.0, 6.0, 4 * 96).reshape(4, 96)
    loss = lambda f: (lambda v: jnp.sum(f(v) * jnp.cos(v)))
    kept = lambda f: [r.shape for r in jax.tree.leaves(jax.vjp(f, x)[1]) if r.size > 1]
    assert kept(act) == [x.shape], kept(act)
    assert len(kept(reference)) > 1                          # the thing being avoided
    np.testing.assert_allclose(jax.grad(loss(act))(x), jax.grad(loss(reference))(x), rtol=1e-6, atol=1e-7)


def test_zero3_style_policy_under_a_mesh(llama_fp32):
    """Params stored sharded over `data`, gathered per layer at use: same loss and grads."""
    model, batch, loss_ref, grads_ref = llama_fp32

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    rules = {name: None for name in PARAM_AXES | {"batch", "length"}}
    policy = compute.ComputePolicy(mesh=mesh, rules={**rules, "batch": "data"}, gather_params=True)
    storage = compute.ComputePolicy(mesh=mesh, rules={**rules, "embed": "data"})
    graphdef, state = nnx.split(model)
    shardings = jax.tree.map(
        lambda v: jax.sharding.NamedSharding(mesh, storage.spec(v.get_metadata()["out_sharding"])),
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    state = jax.device_put(state, shardings)
    sharded_batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    with compute.use(policy):
        fn = jax.jit(jax.value_and_grad(lambda st, b: nnx.merge(graphdef, st)(b)))
        loss, grads = fn(state, sharded_batch)
    np.testing.assert_allclose(loss, loss_ref, rtol=2e-6, atol=2e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- build / config

def test_build_from_section():
    model = build({"type": "llama", **LLAMA_GQA}, nnx.Rngs(0))
    assert isinstance(model, Llama) and model.cfg == LlamaConfig(**LLAMA_GQA)
    model = build({"type": "gpt2", **GPT2_TINY}, nnx.Rngs(0))
    assert isinstance(model, GPT2) and model.cfg.n_inner == 4 * GPT2_TINY["n_embd"]


def test_build_rejects_bad_sections():
    with pytest.raises(ValueError, match="hiden_size") as err:
        make_config({"type": "llama", "hiden_size": 64})
    assert "hidden_size" in str(err.value)          # the valid fields are listed
    with pytest.raises(ValueError, match="n_embed"):
        make_config({"type": "gpt2", "n_embed": 64})
    with pytest.raises(ValueError, match="'bert'"):
        make_config({"type": "bert"})
    with pytest.raises(ValueError, match="type"):
        make_config({"hidden_size": 64})


def test_config_validation():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8)
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 8
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig(hidden_size=60, num_attention_heads=8)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LlamaConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="n_head"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        GPT2Config(activation_function="swish_v9")


def test_bf16_matmul_uses_native_dots_forward_and_backward():
    """On CPU every bf16 projection dot, including the two of its backward pass, is
    bf16 x bf16 -> fp32 (the form XLA:CPU runs natively); values match fp32 math."""
    import re

    from zerojax.models import layers as L

    rng = np.random.default_rng(0)
    x, w, b = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in ((2, 8, 16), (16, 4, 8), (4, 8)))
    weight = jnp.asarray(rng.normal(size=(2, 8, 4, 8)), jnp.float32)
    loss = lambda x, w, b: jnp.sum(L.matmul("bld,dhk->blhk", x, w, b).astype(jnp.float32) * weight)
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    dots = re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)",
                      value_and_grad.lower(x, w, b).as_text())
    assert len(dots) == 3, dots
    assert all(a.endswith("xbf16>") and c.endswith("xf32>") for a, _, c in dots), dots

    as32 = lambda t: t.astype(jnp.float32)
    ref_value, ref = jax.value_and_grad(
        lambda x, w, b: jnp.sum((jnp.einsum("bld,dhk->blhk", x, w) + b) * weight),
        argnums=(0, 1, 2))(as32(x), as32(w), as32(b))
    value, grads = value_and_grad(x, w, b)
    np.testing.assert_allclose(value, ref_value, rtol=2e-2)
    for got, want in zip(grads, ref):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(as32(got), want, rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))
