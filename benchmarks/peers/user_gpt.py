"""The benchmark GPT as a user writes it in Flax NNX, knowing nothing of zerojax.

A Python loop over blocks built from `nnx.Linear`, `nnx.LayerNorm` and `nnx.Embed`, with
`jax.nn.gelu` (tanh) and `jax.nn.dot_product_attention`: no logical axis names, no
`zerojax.compute` calls, no layer scan. The math is torch_gpt.py's (pre-LN, 4x MLP,
learned positions, tied head, mean next-token cross-entropy); weights come from the same
.npz as every other runner.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common import D_FF, D_MODEL, HEAD_DIM, HEADS, LAYERS, LN_EPS, SEQ, VOCAB


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(D_MODEL, epsilon=LN_EPS, rngs=rngs)
        self.q = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        self.k = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        self.v = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        self.attn_proj = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(D_MODEL, epsilon=LN_EPS, rngs=rngs)
        self.c_fc = nnx.Linear(D_MODEL, D_FF, rngs=rngs)
        self.c_proj = nnx.Linear(D_FF, D_MODEL, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        h = self.ln_1(x)
        heads = lambda y: y.reshape(b, t, HEADS, HEAD_DIM)
        attn = jax.nn.dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
                                            is_causal=True)
        x = x + self.attn_proj(attn.reshape(b, t, D_MODEL))
        return x + self.c_proj(jax.nn.gelu(self.c_fc(self.ln_2(x)), approximate=True))


class UserGPT(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.wte = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.wpe = nnx.Param(jnp.zeros((SEQ, D_MODEL)))
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.ln_f = nnx.LayerNorm(D_MODEL, epsilon=LN_EPS, rngs=rngs)

    def __call__(self, batch):
        ids = batch["input_ids"]
        x = self.wte(ids) + self.wpe[...][: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.wte.attend(self.ln_f(x))                   # tied head
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def make_model(weights_path: str) -> UserGPT:
    """The model with the .npz weights (stacked layout, split per block)."""
    model = nnx.eval_shape(lambda: UserGPT(nnx.Rngs(0)))
    w = np.load(weights_path)
    flat = {"wte.embedding": w["wte"], "wpe": w["wpe"], "ln_f.scale": w["ln_f_scale"],
            "ln_f.bias": w["ln_f_bias"]}
    for i in range(LAYERS):
        g = lambda name: w[f"layers.{name}"][i]
        p = f"blocks.{i}."
        flat.update({p + "ln_1.scale": g("ln_1_scale"), p + "ln_1.bias": g("ln_1_bias"),
                     p + "ln_2.scale": g("ln_2_scale"), p + "ln_2.bias": g("ln_2_bias"),
                     p + "attn_proj.kernel": g("attn_proj").reshape(D_MODEL, D_MODEL),
                     p + "attn_proj.bias": g("attn_proj_bias"),
                     p + "c_fc.kernel": g("c_fc"), p + "c_fc.bias": g("c_fc_bias"),
                     p + "c_proj.kernel": g("c_proj"), p + "c_proj.bias": g("c_proj_bias")})
        for name in ("q", "k", "v"):
            flat[p + f"{name}.kernel"] = g(f"{name}_proj").reshape(D_MODEL, D_MODEL)
            flat[p + f"{name}.bias"] = g(f"{name}_bias").reshape(D_MODEL)
    params = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        key = ".".join(str(p) for p in path)
        if flat[key].shape != var.shape:
            raise ValueError(f"{key}: npz {flat[key].shape} vs model {var.shape}")
        var.set_value(np.asarray(flat.pop(key), np.float32))
    if flat:
        raise ValueError(f"unused weights: {sorted(flat)}")
    nnx.update(model, params)
    return model
