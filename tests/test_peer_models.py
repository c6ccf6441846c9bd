"""The peer benchmark's GPT (benchmarks/peers) is one function in PyTorch and in zerojax:
same loss and gradients from the same weights, so its table compares like with like."""
import os
import sys

import jax
import numpy as np
import torch
from flax import nnx

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "peers")
sys.path.insert(0, PEERS)
import common  # noqa: E402
import flax_gpt  # noqa: E402
import torch_gpt  # noqa: E402


def _agree_with_torch(tmp_path, make_model, grad_pairs) -> None:
    """Same loss and gradients as the torch GPT from the same weights; `grad_pairs(grads,
    reference)` names (flax grad, torch grad) pairs, nn.Linear being [out, in]."""
    common.make_weights(str(tmp_path / "weights.npz"))
    common.make_data(str(tmp_path / "data.npy"), steps=1)
    ids = np.load(tmp_path / "data.npy")[0, :2]

    reference = torch_gpt.GPT()
    torch_gpt.load_weights(reference, str(tmp_path / "weights.npz"))
    torch_loss = reference(torch.from_numpy(ids.astype(np.int64)))
    torch_loss.backward()

    graphdef, params = nnx.split(jax.tree.map(np.asarray, make_model(str(tmp_path / "weights.npz"))))
    loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)({"input_ids": ids}))(params)
    grads = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(grads)}

    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    for got, want in grad_pairs(grads, reference):
        want = want.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torch_and_zerojax_gpt_agree(tmp_path):
    _agree_with_torch(tmp_path, flax_gpt.make_model, lambda grads, reference: [
        (grads["wte"], reference.wte.weight.grad),              # stacked layers: [layer, ...]
        (grads["layers.c_fc"][1], reference.blocks[1].c_fc.weight.grad.T),
        (grads["layers.attn_proj"][0].reshape(-1, common.D_MODEL), reference.blocks[0].attn_proj.weight.grad.T),
    ])


def test_torch_gpt_and_a_users_plain_flax_gpt_agree(tmp_path):
    """The user-written module (no zerojax calls) is the same function as the torch GPT."""
    import user_gpt
    _agree_with_torch(tmp_path, user_gpt.make_model, lambda grads, reference: [
        (grads["wte.embedding"], reference.wte.weight.grad),
        (grads["blocks.1.c_fc.kernel"], reference.blocks[1].c_fc.weight.grad.T),
        (grads["blocks.0.attn_proj.kernel"], reference.blocks[0].attn_proj.weight.grad.T),
    ])
