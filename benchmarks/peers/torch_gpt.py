"""The benchmark GPT in PyTorch: pre-LN, GELU (tanh) MLP 4x, learned positions, tied head.

Same math as zerojax's `GPT2` (flax_gpt.py); `load_weights` maps the shared .npz (stacked,
zerojax layout) onto `nn.Linear`s: a [D, H, K] projection becomes weight [H*K, D] (x @ W.T).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import D_FF, D_MODEL, HEADS, LAYERS, LN_EPS, SEQ, VOCAB


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(D_MODEL, eps=LN_EPS)
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.k = nn.Linear(D_MODEL, D_MODEL)
        self.v = nn.Linear(D_MODEL, D_MODEL)
        self.attn_proj = nn.Linear(D_MODEL, D_MODEL)
        self.ln_2 = nn.LayerNorm(D_MODEL, eps=LN_EPS)
        self.c_fc = nn.Linear(D_MODEL, D_FF)
        self.c_proj = nn.Linear(D_FF, D_MODEL)

    def forward(self, x):
        B, L, D = x.shape
        h = self.ln_1(x)
        q, k, v = (t(h).view(B, L, HEADS, D // HEADS).transpose(1, 2) for t in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D_MODEL)
        self.wpe = nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL, eps=LN_EPS)

    def forward(self, input_ids):
        """Mean next-token cross-entropy (position t predicts token t+1)."""
        x = self.wte(input_ids) + self.wpe.weight[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T               # tied head
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))


def load_weights(model: GPT, path: str) -> None:
    w = np.load(path)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    sd = {"wte.weight": t(w["wte"]), "wpe.weight": t(w["wpe"]),
          "ln_f.weight": t(w["ln_f_scale"]), "ln_f.bias": t(w["ln_f_bias"])}
    for i in range(LAYERS):
        g = lambda name: w[f"layers.{name}"][i]
        p = f"blocks.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = t(g("ln_1_scale")), t(g("ln_1_bias"))
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = t(g("ln_2_scale")), t(g("ln_2_bias"))
        for name in ("q", "k", "v"):
            sd[p + f"{name}.weight"] = t(g(f"{name}_proj").reshape(D_MODEL, D_MODEL).T)
            sd[p + f"{name}.bias"] = t(g(f"{name}_bias").reshape(D_MODEL))
        sd[p + "attn_proj.weight"] = t(g("attn_proj").reshape(D_MODEL, D_MODEL).T)
        sd[p + "attn_proj.bias"] = t(g("attn_proj_bias"))
        sd[p + "c_fc.weight"], sd[p + "c_fc.bias"] = t(g("c_fc").T), t(g("c_fc_bias"))
        sd[p + "c_proj.weight"], sd[p + "c_proj.bias"] = t(g("c_proj").T), t(g("c_proj_bias"))
    model.load_state_dict(sd, strict=True)
