"""`zerojax serve` over HTTP on 127.0.0.1: the official `openai` client, streaming, concurrency,
bounded admission, disconnects, errors and SIGTERM. One warm server process per module
(a tiny byte Llama checkpoint), compared with the offline pipeline on the same weights."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

import zerojax
from zerojax import inference
from zerojax.models import Llama, LlamaConfig

pytestmark = pytest.mark.slow

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)
ENGINE_ARGS = ["--token-budget", "16", "--max-seqs", "8", "--num-pages", "24", "--page-size", "8"]
PROMPTS = ["def main(", "import os\n", "class A:", "for i in range(", "x = [", "# comment", "if __name__", "ret"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    zerojax.initialize(model_fn=lambda r: Llama(TINY, rngs=r), config=config).save_checkpoint(str(root))
    return str(root)


class Server:
    def __init__(self, checkpoint: str, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if "device_count" not in f)
        self.proc = subprocess.Popen([sys.executable, "-m", "zerojax.cli", "serve", checkpoint, "--port",
                                      str(self.port), "--served-model-name", "tiny", *ENGINE_ARGS, *extra],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become healthy in 120 s")

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(checkpoint):
    pipe = inference.pipeline(checkpoint, token_budget=16, max_seqs=8, num_pages=24, page_size=8)
    return lambda prompts, **kw: [o.generated_text for o in pipe(prompts, **kw)]


def test_openai_client_completions_and_chat_equal_the_pipeline(client, offline):
    greedy = dict(temperature=0.0, max_tokens=12)
    out = client.completions.create(model="tiny", prompt=PROMPTS[:3], **greedy)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == offline(PROMPTS[:3], temperature=0.0, max_new_tokens=12)
    assert out.usage.completion_tokens == 36 and out.usage.prompt_tokens == sum(len(p) for p in PROMPTS[:3])
    assert {c.finish_reason for c in out.choices} == {"length"}

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], **greedy)
    assert chat.choices[0].message.content == offline(["user: hello\nassistant:"], temperature=0.0,
                                                      max_new_tokens=12)[0]

    streamed = client.completions.create(model="tiny", prompt=PROMPTS[0], stream=True,
                                         stream_options={"include_usage": True}, **greedy)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == texts[0]
    assert chunks[-1].usage.completion_tokens == 12
    chat_stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                 stream=True, **greedy)
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == chat.choices[0].message.content


def test_n_seed_stop_and_logprobs(client, offline):
    sampled = dict(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, seed=7)
    first = client.completions.create(n=2, **sampled)
    again = client.completions.create(n=2, **sampled)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]    # same seed, same answers
    assert len(texts) == 2 and texts == offline([PROMPTS[1]], n=2, seed=7, temperature=1.0, max_new_tokens=10)

    full = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0.0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0.0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.index(stop)]

    lp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0.0, logprobs=3)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 4 and all(len(t) <= 3 for t in logprobs.top_logprobs)
    assert all(v <= 0 for v in logprobs.token_logprobs)


def test_48_concurrent_streams_all_complete_with_their_offline_text(server, offline):
    prompts = [PROMPTS[i % len(PROMPTS)] + str(i) for i in range(48)]
    want = offline(prompts, temperature=0.0, max_new_tokens=16)

    async def one(http, prompt, limit):
        async with limit:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0.0, "stream": True}
            text = ""
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        text += "".join(c["text"] for c in chunk["choices"])
            return text

    async def run():
        limit = asyncio.Semaphore(48)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(one(http, p, limit) for p in prompts))

    assert asyncio.run(run()) == want
    assert server.metric("zerojax:kv_pages_used") == 0           # everything finished freed its pages


def test_disconnect_mid_stream_frees_the_pages(server):
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 1.0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert server.metric("zerojax:num_requests_running") == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metric("zerojax:num_requests_running"):
        time.sleep(0.05)
    assert server.metric("zerojax:num_requests_running") == 0
    assert server.metric("zerojax:kv_pages_used") == 0
    assert server.metric("zerojax:requests_aborted_total") >= 1


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "max_tokens": 200}, 400, "exceeds this model's context of 128"),
    ({"prompt": "x" * 300}, 400, "the prompt has 300 tokens"),
    ({"prompt": "x", "model": "other"}, 404, "'other' does not exist"),
    ({"prompt": "x", "logit_bias": {"1": 1}}, 400, "'logit_bias' is not supported"),
    ({"prompt": "x", "frobnicate": 1}, 400, "unknown parameter 'frobnicate'"),
    ({"prompt": [999]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature must be in"),
    ({"prompt": "x" * (5 << 20)}, 413, "limit is"),
    ({}, 400, "prompt is required"),
])
def test_bad_requests_get_their_status_and_message(server, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_max_queue_gives_429s_and_every_accepted_request_completes_then_sigterm_drains(checkpoint):
    small = Server(checkpoint, "--max-queue", "4", "--api-key", "k")
    try:
        assert httpx.post(small.url + "/v1/completions", json={"prompt": "x"}).status_code == 401

        async def one(http, i):
            r = await http.post("/v1/completions", json={"prompt": PROMPTS[i % 8], "max_tokens": 30,
                                                         "temperature": 0.0, "ignore_eos": True})
            return r.status_code, r.headers.get("retry-after"), r.json()

        async def burst():
            async with httpx.AsyncClient(base_url=small.url, timeout=120,
                                         headers={"authorization": "Bearer k"}) as http:
                return await asyncio.gather(*(one(http, i) for i in range(16)))

        results = asyncio.run(burst())
        codes = [code for code, _, _ in results]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 4
        assert all(after == "1" for code, after, _ in results if code == 429)
        assert all(len(body["choices"][0]["text"]) > 0 and body["usage"]["completion_tokens"] == 30
                   for code, _, body in results if code == 200)

        # SIGTERM while a long stream is in flight: it finishes, then the server exits 0.
        body = {"model": "tiny", "prompt": "x", "max_tokens": 60, "temperature": 0.0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(base_url=small.url, timeout=60, headers={"authorization": "Bearer k"}) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)
                small.proc.send_signal(signal.SIGTERM)
                rest = list(lines)
        assert "data: [DONE]" in rest
        assert small.proc.wait(timeout=60) == 0
    finally:
        small.stop()
