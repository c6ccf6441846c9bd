"""The FastAPI routes of `zerojax serve`: OpenAI's completions and chat, models, health, metrics.

Handlers parse and validate (`protocol`), hand the sequences to the one engine loop
(`loop.EngineLoop`) and read their outputs back; they never touch the engine. Streaming
is Server-Sent Events, one chunk per engine step that produced text for a choice, then
`data: [DONE]`; the text of a chunk is whole characters only (the engine's detokenizer
holds back split UTF-8 and possible stop strings), so the chunks concatenate to the
non-streamed text. A client that goes away mid-request has its sequences aborted, which
frees their KV pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from zerojax.inference.engine import InferenceEngine, RequestOutput, child_seed
from zerojax.serve import protocol
from zerojax.serve.loop import EngineDown, EngineLoop, Failed, QueueFull
from zerojax.serve.protocol import APIError

MAX_BODY_BYTES = 4 << 20           # well above any prompt that fits a context: a long prompt gets the 400
DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 256
    drain_timeout: float = 30.0
    max_body_bytes: int = MAX_BODY_BYTES
    chat_render: Any = protocol.plain_chat


def create_app(engine: InferenceEngine, config: ServerConfig) -> FastAPI:
    loop = EngineLoop(engine, max_queue=config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        await asyncio.to_thread(loop.stop, config.drain_timeout)

    app = FastAPI(title="zerojax", lifespan=lifespan)
    app.state.loop = loop
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):            # a bug; still OpenAI's shape
        return JSONResponse(APIError(500, f"internal error: {error!r}").body(), status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is not None and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {config.max_body_bytes}")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {config.max_body_bytes}")
        body = protocol.parse_json(raw)
        model = body.get("model")
        if model is not None and model != config.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{config.served_model_name!r}", "model", "model_not_found")
        return body

    @app.get("/health")
    async def health():
        if loop.error is not None:
            return JSONResponse(APIError(503, f"the engine loop stopped: {loop.error!r}").body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(loop.metrics.text(), media_type=loop.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model", "created": created,
                                            "owned_by": "zerojax", "max_model_len": engine.max_context}]}

    def encode(text: str) -> list[int]:
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        return engine.tokenizer.encode(text)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        parsed = protocol.parse_completion(body, encode=encode, vocab=engine.geometry.vocab_size)
        return await generate(request, parsed, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        if engine.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer; this model has none (use /v1/completions with token ids)")
        parsed = protocol.parse_chat(body, render=config.chat_render, encode=encode)
        return await generate(request, parsed, "chatcmpl")

    async def generate(request: Request, parsed: protocol.GenerationRequest, kind: str):
        protocol.check_lengths(parsed, engine.max_context)
        params = parsed.params
        seed = params.seed if params.seed is not None else int(np.random.default_rng().integers(0, 2 ** 31))
        base = f"{kind}-{uuid.uuid4().hex[:24]}"
        sequences, choice_of = [], {}
        for p, ids in enumerate(parsed.prompts):
            for j in range(params.n):
                index = p * params.n + j
                request_id = f"{base}-{index}"
                choice_of[request_id] = (index, p)
                sequences.append((request_id, ids, dataclasses.replace(params, n=1, seed=child_seed(seed, j))))
        try:
            outputs = loop.submit(sequences)
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity: {e}; retry later", code="queue_full") from None
        except EngineDown as e:
            raise APIError(503, str(e), code="engine_down") from None
        reply = Reply(engine, parsed, base, config.served_model_name, choice_of)
        if parsed.stream:
            return StreamingResponse(stream(outputs, reply, set(choice_of)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finals = await collect(request, outputs, set(choice_of))
        return reply.full(finals)

    async def collect(request: Request, outputs: asyncio.Queue, open_ids: set[str]) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while open_ids:
                # Look for a gone client on a clock, not only when idle: tokens keep arriving.
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        return finals
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                try:
                    item = await asyncio.wait_for(outputs.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, Failed):
                    raise APIError(item.status, str(item.error))
                if item.finished:
                    open_ids.discard(item.request_id)
                    finals[item.request_id] = item
            return finals
        finally:
            for request_id in open_ids:
                loop.abort(request_id)

    async def stream(outputs: asyncio.Queue, reply: "Reply", open_ids: set[str]) -> AsyncIterator[str]:
        try:
            for chunk in reply.opening():
                yield sse(chunk)
            while open_ids:
                item = await outputs.get()
                if isinstance(item, Failed):
                    yield sse(APIError(item.status, str(item.error)).body())
                    open_ids.discard(item.request_id)
                    continue
                for chunk in reply.delta(item):
                    yield sse(chunk)
                if item.finished:
                    open_ids.discard(item.request_id)
            if reply.parsed.include_usage:
                yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:                                  # the client left (cancelled) or we finished
            for request_id in open_ids:
                loop.abort(request_id)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """OpenAI response bodies for one request's choices, whole or as stream chunks."""

    def __init__(self, engine: InferenceEngine, parsed: protocol.GenerationRequest, response_id: str, model: str,
                 choice_of: dict[str, tuple[int, int]]):
        self.engine, self.parsed, self.id, self.model, self.choice_of = engine, parsed, response_id, model, choice_of
        self.created = int(time.time())
        self.sent_logprobs: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}

    # ---- pieces
    def _token_text(self, token: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    def _completion_logprobs(self, entries, offset: int) -> dict:
        tokens = [self._token_text(e.token_id) for e in entries]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(i): lp for i, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, entries) -> dict:
        def item(token, logprob):
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                            for e in entries]}

    def _prefix(self, prompt_index: int) -> str:
        if not self.parsed.echo:
            return ""
        text = self.parsed.prompt_texts[prompt_index]
        if text is None and self.engine.tokenizer is not None:
            text = self.engine.tokenizer.decode(self.parsed.prompts[prompt_index])
        return text or ""

    def _usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.parsed.prompts)
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- whole responses
    def full(self, finals: dict[str, RequestOutput]) -> dict:
        choices = []
        for request_id, out in finals.items():
            index, p = self.choice_of[request_id]
            self.completion_tokens[request_id] = len(out.token_ids)
            text = out.text if out.text is not None else ""
            logprobs = None
            if self.parsed.logprobs is not None:
                logprobs = (self._chat_logprobs(out.logprobs) if self.parsed.chat
                            else self._completion_logprobs(out.logprobs, len(self._prefix(p))))
            if self.parsed.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                          "finish_reason": out.finish_reason}
            else:
                choice = {"index": index, "text": self._prefix(p) + text, "logprobs": logprobs,
                          "finish_reason": out.finish_reason}
                if out.text is None:
                    choice["token_ids"] = out.token_ids         # no tokenizer: the ids are the answer
            choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        return {"id": self.id, "object": "chat.completion" if self.parsed.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage()}

    # ---- streams
    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.parsed.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> list[dict]:
        """Chat streams open each choice with the assistant role (OpenAI's first delta)."""
        if not self.parsed.chat:
            openings = []
            for index, p in sorted(set(self.choice_of.values())):
                if self._prefix(p):
                    openings.append(self._chunk([{"index": index, "text": self._prefix(p), "logprobs": None,
                                                  "finish_reason": None}]))
            return openings
        return [self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for index, _ in sorted(self.choice_of.values())]

    def delta(self, out: RequestOutput) -> list[dict]:
        index, _ = self.choice_of[out.request_id]
        self.completion_tokens[out.request_id] = len(out.token_ids)
        text = out.new_text or ""
        logprobs = None
        if self.parsed.logprobs is not None and out.logprobs is not None:
            sent = self.sent_logprobs.get(out.request_id, 0)
            fresh = out.logprobs[sent:] if (text or out.finished) else []
            if fresh:
                self.sent_logprobs[out.request_id] = sent + len(fresh)
                logprobs = self._chat_logprobs(fresh) if self.parsed.chat else self._completion_logprobs(fresh, 0)
        chunks = []
        if text or logprobs is not None or (out.text is None and out.new_token_ids):
            if self.parsed.chat:
                choice = {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
            else:
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
                if out.text is None:
                    choice["token_ids"] = out.new_token_ids
            chunks.append(self._chunk([choice]))
        if out.finished:
            end = {"index": index, "logprobs": None, "finish_reason": out.finish_reason}
            end.update({"delta": {}} if self.parsed.chat else {"text": ""})
            chunks.append(self._chunk([end]))
        return chunks

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.parsed.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self._usage()}
