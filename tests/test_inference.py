"""The serving engine: paged, batched, chunked greedy decoding equals full recompute; the
pool never deadlocks or drops; sampling is per request; nothing compiles after warm-up."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zerojax import inference
from zerojax.config import ConfigError
from zerojax.inference.kv_cache import bytes_per_token
from zerojax.models import Llama, LlamaConfig
from tests.helpers import compile_events

SERVE_LLAMA = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(0, 256, n)) for n in (3, 40, 17, 1, 29)]    # 40 > budget: chunked prefill
NEW = 10
GREEDY = {"max_new_tokens": NEW, "temperature": 0.0}


@pytest.fixture(scope="module")
def model():
    return Llama(SERVE_LLAMA, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def full_logits(model):
    return full_recompute(model)


def full_recompute(model):
    """ids -> logits at the last position, recomputing the whole window (one compile: padded)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def last(state, ids, length):
        return nnx.merge(graphdef, state).logits(ids[None])[0, length - 1]

    def run(ids):
        padded = np.zeros(SERVE_LLAMA.max_position_embeddings, np.int32)
        padded[:len(ids)] = ids
        return np.asarray(last(state, padded, len(ids)))
    return run


def reference_greedy(full_logits, prompt, new=NEW):
    ids = list(prompt)
    for _ in range(new):
        ids.append(int(np.argmax(full_logits(ids))))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def references(full_logits):
    return [reference_greedy(full_logits, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def chunked(model):
    """Budget 16 (prompts over 16 tokens prefill in chunks), pages of 4, prefix caching on."""
    return inference.pipeline(model, token_budget=16, page_size=4, keep_logits=True)


def test_greedy_chunked_paged_batched_equals_full_recompute(chunked, references, full_logits):
    engine = chunked.engine
    ids = [engine.add_request(p, inference.SamplingParams(**GREEDY)) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    for request_id, prompt, want in zip(ids, PROMPTS, references):
        out = engine.release(request_id)
        assert out.token_ids == want and out.finish_reason == "length"
        for k, logits in enumerate(out.logits):        # cached-decode logits vs full forward
            np.testing.assert_allclose(logits, full_logits(list(prompt) + want[:k]), atol=1e-4, rtol=0)
    engine.pool.check()
    assert engine.pool.used() == 0                     # finished sequences gave their pages back


def test_one_page_per_sequence_without_prefix_caching(model, references):
    pipe = inference.pipeline(model, token_budget=16, page_size=128, prefix_caching=False)
    assert [o.token_ids for o in pipe(PROMPTS, **GREEDY)] == references


def test_shared_prefix_is_computed_once(chunked, full_logits):
    system = list(RNG.integers(0, 256, 24))
    prompts = [system + [5, 6], system + [7], system + [8, 9, 10]]
    outs = chunked(prompts[:1], **GREEDY)
    before = chunked.engine.stats()["prefix_cache_hit_tokens"]
    outs += chunked(prompts[1:], **GREEDY)
    assert chunked.engine.stats()["prefix_cache_hit_tokens"] - before == 2 * 24   # 6 full pages each
    assert [o.token_ids for o in outs] == [reference_greedy(full_logits, p) for p in prompts]


def test_page_bytes_follow_the_formula(chunked):
    engine, g = chunked.engine, chunked.engine.geometry
    pages = engine.runner.pages
    stored = (pages["k"].nbytes + pages["v"].nbytes) / ((engine.num_pages + 1) * engine.page_size)
    assert stored == engine.bytes_per_token == bytes_per_token(g, 4) == 2 * g.layers * g.kv_heads * g.head_dim * 4


def test_64_requests_through_a_pool_that_holds_4(model, full_logits):
    """28 pages of 4 tokens; each request needs up to 7: admission, growth, preemption."""
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, int(n))) for n in rng.integers(4, 21, 64)]
    pipe = inference.pipeline(model, token_budget=16, page_size=4, num_pages=28, max_seqs=8)
    outs = pipe(prompts, max_new_tokens=8, temperature=0.0)
    alone = [reference_greedy(full_logits, p, 8) for p in prompts]
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and o.generated_length == 8 for o in outs)
    stats = pipe.engine.stats()
    assert stats["preemptions"] > 0 and stats["running"] == stats["waiting"] == 0
    pipe.engine.pool.check()


@pytest.mark.parametrize("tensor", [2, 4])
def test_tensor_parallel_outputs_equal_one_device(model, references, tensor):
    pipe = inference.pipeline(model, tensor_parallel=tensor, token_budget=16, page_size=4)
    k_pages = pipe.engine.runner.pages["k"]
    kv_heads = SERVE_LLAMA.num_key_value_heads
    # K/V heads split over tensor like the model's (replicated when fewer heads than ranks).
    assert k_pages.addressable_shards[0].data.shape[3] == (kv_heads // tensor if kv_heads % tensor == 0 else kv_heads)
    assert [o.token_ids for o in pipe(PROMPTS, **GREEDY)] == references


def test_same_seed_same_tokens_whatever_the_batch(chunked):
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    alone = chunked([PROMPTS[2]], **sampled)[0].token_ids
    engine = chunked.engine
    mine = engine.add_request(PROMPTS[2], inference.SamplingParams(**sampled))
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, inference.SamplingParams(max_new_tokens=12, temperature=0.8, seed=100 + i))
    while engine.has_unfinished():
        engine.step()
    assert engine.release(mine).token_ids == alone
    for request_id in list(engine.requests):
        engine.release(request_id)
    other = chunked([PROMPTS[2]], **{**sampled, "seed": 8})[0].token_ids
    assert other != alone


def test_top_k_1_is_greedy_and_n_is_prompt_major(chunked, references):
    outs = chunked(PROMPTS[:2], max_new_tokens=NEW, temperature=1.3, top_k=1, n=2)
    assert [o.token_ids for o in outs] == [references[0]] * 2 + [references[1]] * 2
    assert [o.prompt for o in outs] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2


def test_stop_strings_cut_the_text(chunked):
    text = "def main():\n    return 0\n"
    full = chunked(text, max_new_tokens=24, temperature=0.0)[0]
    stop = full.generated_text[5:7]
    cut = chunked(text, max_new_tokens=24, temperature=0.0, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.generated_text == full.generated_text[:full.generated_text.find(stop)]
    assert full.token_ids[:cut.generated_length] == cut.token_ids


def test_stop_token_ids_and_min_new_tokens(chunked, references):
    first = references[0][0]
    stopped = chunked([PROMPTS[0]], max_new_tokens=NEW, temperature=0.0, stop_token_ids=[first])[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = chunked([PROMPTS[0]], max_new_tokens=NEW, temperature=0.0, stop_token_ids=[first], min_new_tokens=3)[0]
    assert held.generated_length >= 3 and first not in held.token_ids[:3]


def test_logprobs_are_the_sampled_distribution(chunked):
    engine = chunked.engine
    params = inference.SamplingParams(max_new_tokens=4, temperature=0.7, seed=3, logprobs=5)
    request_id = engine.add_request(PROMPTS[1], params)
    while engine.has_unfinished():
        engine.step()
    out = engine.release(request_id)
    for token, entry, logits in zip(out.token_ids, out.logprobs, out.logits):
        want = jax.nn.log_softmax(jnp.asarray(logits) / 0.7)
        assert entry.token_id == token and abs(entry.logprob - float(want[token])) <= 1e-5
        assert [i for i, _ in entry.top] == list(np.argsort(-np.asarray(want))[:5])


def test_no_recompiles_after_warm_up(chunked):
    mix = [("x" * n, {"max_new_tokens": m, "temperature": t, "top_k": k, "n": nn})
           for n, m, t, k, nn in [(1, 3, 0.0, None, 1), (50, 7, 0.9, 5, 2), (13, 1, 1.2, None, 3), (31, 12, 0.0, 2, 1)]]
    with compile_events() as events:
        for prompt, sampling in mix:
            chunked([prompt], **sampling, stop=["zz"], logprobs=2, repetition_penalty=1.2)
    assert events == []


def test_bad_requests_are_clear_errors(chunked, model):
    cases = [([], "empty"), ([1] * 128, "max_context is 128"), ([300], "outside the vocabulary")]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            chunked([prompt], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        chunked([[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="unknown sampling parameter.*beam_width"):
        chunked([[1]], beam_width=2)
    small = inference.pipeline(model, page_size=4, num_pages=3, token_budget=16, warmup=False)
    with pytest.raises(ValueError, match=r"needs 5 KV pages of 4 tokens; the pool has num_pages=3"):
        small([[1] * 12], max_new_tokens=8)
    with pytest.raises(ConfigError, match="tensor_parallel=16 needs 16 devices"):
        inference.pipeline(model, tensor_parallel=16)


def test_a_module_without_the_protocol_is_a_config_error():
    from tests.helpers import PlainMLP
    with pytest.raises(ConfigError, match="run_layers_cached"):
        inference.pipeline(PlainMLP(nnx.Rngs(0)))
