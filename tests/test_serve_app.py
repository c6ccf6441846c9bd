"""The serving app in this process (uvicorn on a thread, 127.0.0.1), where a test can reach
the engine behind it: HF chat templates against `transformers`, an engine that dies (503,
never a hang), and a non-streamed client that leaves mid-generation (its pages freed)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
from flax import nnx

from zerojax import inference
from zerojax.models import Llama, LlamaConfig
from zerojax.serve import protocol
from zerojax.serve.app import ServerConfig, create_app

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
# Zephyr-style: a system prompt, role tags, and a generation prompt the renderer must add.
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "yes?"}, {"role": "user", "content": "é ok"}],
]


@pytest.fixture(scope="module")
def pipe():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    return inference.pipeline(model, token_budget=16, max_seqs=8, num_pages=48, page_size=8)


@pytest.fixture(scope="module")
def hf_chat_dir(tmp_path_factory):
    """A HF tokenizer directory with a chat template, written by `transformers` itself."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {chr(i): i for i in range(32, 127)}
    vocab["</s>"] = len(vocab) + 32
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="</s>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tok.chat_template = TEMPLATE
    directory = tmp_path_factory.mktemp("chat")
    tok.save_pretrained(directory)
    return str(directory), transformers.AutoTokenizer.from_pretrained(directory)


@contextlib.contextmanager
def serving(pipe, **config):
    """The app over `pipe.engine` on a free loopback port, for the `with` block."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipe.engine, ServerConfig(served_model_name="tiny", **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server.capture_signals = contextlib.nullcontext        # signals belong to the main thread
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield url, app.state.loop
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_chat_template_renders_as_transformers_does(hf_chat_dir):
    directory, hf_tokenizer = hf_chat_dir
    render = protocol.chat_renderer(directory)
    for messages in CONVERSATIONS:
        assert render(messages) == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    assert protocol.chat_renderer(None) is protocol.plain_chat          # no directory: the documented one
    assert protocol.plain_chat(CONVERSATIONS[0]) == "user: hello\nassistant:"


def test_chat_endpoint_feeds_the_templated_prompt(pipe, hf_chat_dir):
    directory, hf_tokenizer = hf_chat_dir
    rendered = hf_tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    want = pipe([rendered], max_new_tokens=8, temperature=0.0)[0]
    with serving(pipe, chat_render=protocol.chat_renderer(directory)) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": CONVERSATIONS[1], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want.generated_text
    assert body["usage"]["prompt_tokens"] == want.prompt_length


def test_non_streamed_client_that_leaves_frees_its_pages(pipe, monkeypatch):
    engine = pipe.engine
    step = engine.step

    def slow_step():                                   # ~100 tokens would take ~3 s
        time.sleep(0.03)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = {"model": "tiny", "prompt": "def main(", "max_tokens": 100, "temperature": 1.0, "ignore_eos": True}
    with serving(pipe) as (url, loop):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (loop.accepted or engine.has_unfinished()):
            time.sleep(0.05)
        assert loop.accepted == 0 and not engine.has_unfinished()
        assert engine.stats()["pages_used"] == 0
        metrics = httpx.get(url + "/metrics").text
        assert "zerojax:requests_aborted_total 1.0" in metrics, [l for l in metrics.splitlines() if "abort" in l or "running" in l]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the loop re-raises its death
def test_an_engine_that_dies_answers_503_and_health_says_so(pipe, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    with serving(pipe) as (url, loop):
        assert httpx.get(url + "/health").status_code == 200
        monkeypatch.setattr(pipe.engine, "step", broken_step)
        r = httpx.post(url + "/v1/completions", timeout=30, json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        streamed = httpx.post(url + "/v1/completions", timeout=30,
                              json={"prompt": "x", "max_tokens": 4, "stream": True})
        assert streamed.status_code == 503                  # refused up front once the loop is down
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        assert loop.accepted == 0
    monkeypatch.undo()
    engine = pipe.engine
    for request_id in list(engine.requests):                # leave the shared engine clean
        engine.abort(request_id)
        engine.release(request_id)
