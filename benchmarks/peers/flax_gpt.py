"""The benchmark GPT in Flax NNX: zerojax's reference `GPT2` at the benchmark's shape.

`zerojax.models.GPT2` is a plain `nnx.Module` (stacked layers under `lax.scan`, logical
axis names in each param's metadata) with the same math as torch_gpt.py: pre-LN, GELU
(tanh) MLP 4x, learned positions, tied head, mean next-token cross-entropy. Its param tree
is the .npz layout (`wte`, `wpe`, `layers.<name>` stacked over layers, `ln_f_*`), so
loading is a copy with no reshaping.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from common import D_FF, D_MODEL, HEADS, LAYERS, LN_EPS, SEQ, VOCAB
from zerojax.models.gpt2 import GPT2, GPT2Config

CONFIG = GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS,
                    n_positions=SEQ, n_inner=D_FF, layer_norm_epsilon=LN_EPS,
                    activation_function="gelu_new")


def make_model(weights_path: str) -> GPT2:
    """The model with the .npz weights. Built with `nnx.eval_shape` (shapes only) and
    filled from host arrays, as one loads pretrained weights: a random init would compile
    and run a dozen eager ops only to be overwritten."""
    model = nnx.eval_shape(lambda: GPT2(CONFIG, rngs=nnx.Rngs(0)))
    w = np.load(weights_path)
    params = nnx.state(model, nnx.Param)
    seen = set()
    for path, var in nnx.to_flat_state(params):
        key = ".".join(str(p) for p in path)
        if w[key].shape != var.shape:
            raise ValueError(f"{key}: npz {w[key].shape} vs model {var.shape}")
        var.set_value(w[key])
        seen.add(key)
    if seen != set(w.files):
        raise ValueError(f"unmatched weights: {sorted(set(w.files) ^ seen)}")
    nnx.update(model, params)
    return model
