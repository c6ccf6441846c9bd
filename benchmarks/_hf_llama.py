"""The random-weight HF Llama models the serving benchmarks share (no download).

Built in `transformers` and saved as a HF directory, which zerojax loads, so both sides of
a comparison run the very same fp32 weights. No EOS token: every request generates
exactly its max_new_tokens on both sides.
"""
from __future__ import annotations

import numpy as np

MODELS = {
    # 25.4M params: weight streaming (100 MB fp32 per token) bounds batch 1.
    "anchor": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1536),
    # ~1M params: per-token overhead, not bandwidth, bounds it.
    "tiny": dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384),
}
VOCAB, MAX_POSITIONS = 256, 1024


def hf_model(name: str, directory: str):
    """Build model `name` with seeded random weights, save it to `directory`, return it."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                      tie_word_embeddings=False, **MODELS[name])
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    return model


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fixed_requests(count: int, prompt: int = 32, new: int = 128, seed: int = 0):
    """`count` (prompt ids, new tokens) pairs of one shape."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, VOCAB, prompt).tolist(), new) for _ in range(count)]


def mixed_requests(count: int, seed: int = 0, low: int = 16, high: int = 256):
    """MII's mixed-length method: prompt and output lengths uniform in [low, high]."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, VOCAB, int(rng.integers(low, high + 1))).tolist(), int(rng.integers(low, high + 1)))
            for _ in range(count)]
