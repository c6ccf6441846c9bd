"""Where serving weights come from: HF directories (greedy equals `transformers` generate),
a checkpoint of a ZeRO-3 run, a live training Engine; and the Pallas kernels in the step."""
from __future__ import annotations

import pytest
import torch
import transformers

import zerojax
from zerojax import inference
from tests.helpers import token_batches
from tests.test_inference import PROMPTS, SERVE_LLAMA, full_recompute, reference_greedy

torch.set_num_threads(2)
NEW = 10


def _hf_perturbed(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_generate(model, prompt, **kwargs):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                             pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


HF_MODELS = {
    # No EOS id: both generate exactly max_new_tokens.
    "llama_gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=None)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=None, eos_token_id=None)),
}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_greedy_equals_transformers_generate(name, tmp_path):
    torch.manual_seed(0)
    model = _hf_perturbed(HF_MODELS[name]())
    model.save_pretrained(tmp_path)
    pipe = inference.pipeline(str(tmp_path), token_budget=16, page_size=4)
    assert pipe.tokenizer is None                          # no tokenizer.json: token ids only
    prompts = [[p % 128 for p in prompt] for prompt in PROMPTS]
    outs = pipe(prompts, max_new_tokens=NEW, temperature=0.0)
    assert [o.token_ids for o in outs] == [_hf_generate(model, p) for p in prompts]
    assert all(o.generated_text is None for o in outs)
    penalised = pipe(prompts[:2], max_new_tokens=NEW, temperature=0.0, repetition_penalty=1.5)
    assert [o.token_ids for o in penalised] == [_hf_generate(model, p, repetition_penalty=1.5) for p in prompts[:2]]


@pytest.fixture(scope="module")
def trained_engine():
    config = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = zerojax.initialize(model_fn=lambda r: zerojax.models.Llama(SERVE_LLAMA, rngs=r), config=config)
    engine.train_step(token_batches(1, 8, seq=32, vocab=256)[0])
    return engine


def _greedy_of(module, prompts):
    logits = full_recompute(module)
    return [reference_greedy(logits, p, NEW) for p in prompts]


def test_checkpoint_and_live_engine_serve_the_trained_weights(trained_engine, tmp_path):
    want = _greedy_of(trained_engine.model(), PROMPTS[:3])
    trained_engine.save_checkpoint(str(tmp_path))
    from_checkpoint = inference.pipeline(str(tmp_path), token_budget=16, page_size=4)
    assert from_checkpoint.tokenizer is not None                  # vocab 256: the byte tokenizer
    assert [o.token_ids for o in from_checkpoint(PROMPTS[:3], max_new_tokens=NEW, temperature=0.0)] == want

    live = inference.pipeline(trained_engine, token_budget=16, page_size=4)
    assert [o.token_ids for o in live(PROMPTS[:3], max_new_tokens=NEW, temperature=0.0)] == want
    # The hybrid-engine switch: after another training step the pipeline serves the new weights.
    trained_engine.train_step(token_batches(1, 8, seq=32, vocab=256, seed=5)[0])
    live.update_params(trained_engine.state.params)
    new_want = _greedy_of(trained_engine.model(), PROMPTS[:3])
    assert new_want != want
    assert [o.token_ids for o in live(PROMPTS[:3], max_new_tokens=NEW, temperature=0.0)] == new_want


def test_pallas_kernels_in_the_step_give_the_same_tokens(trained_engine):
    xla = inference.pipeline(trained_engine, token_budget=16, page_size=4, kernels="xla")
    pallas = inference.pipeline(trained_engine, token_budget=16, page_size=4, kernels="pallas")
    assert pallas.engine.runner.policy.kernels == "pallas"
    prompts = PROMPTS[:3]
    assert [o.token_ids for o in pallas(prompts, max_new_tokens=6, temperature=0.0)] == \
        [o.token_ids for o in xla(prompts, max_new_tokens=6, temperature=0.0)]
