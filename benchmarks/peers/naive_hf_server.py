"""The simplest serving peer: HF `transformers` generate behind FastAPI, one request at a time.

    python3 benchmarks/peers/naive_hf_server.py HF_DIR --port 8001 [--threads 2]

What a user gets by wrapping `model.generate` in a web handler: no batching, requests wait
in arrival order for one lock. It speaks the slice of `/v1/completions` that
`serve_load.py` sends (token-id prompt, `max_tokens`, greedy, `stream: true`) and streams
one SSE chunk per token, so both servers are timed by the same client. A client that
disconnects is dropped from the queue, or stops its generation at the next token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading

import torch
import transformers
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers.generation.streamers import BaseStreamer


class _TokenQueue(BaseStreamer):
    """Hands each generated token to the event loop; the first put() is the prompt."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, cancelled: threading.Event):
        self.loop, self.queue, self.cancelled, self.prompt_seen = loop, queue, cancelled, False

    def put(self, value):
        if self.prompt_seen:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(value.reshape(-1)[0]))
        self.prompt_seen = True

    def end(self):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _StopWhenCancelled(transformers.StoppingCriteria):
    def __init__(self, cancelled: threading.Event):
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool)


def create_app(model) -> FastAPI:
    app = FastAPI()
    one_at_a_time = asyncio.Lock()

    def generate(ids: list[int], new: int, streamer, cancelled):
        with torch.no_grad():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=new, min_new_tokens=new, streamer=streamer,
                           stopping_criteria=transformers.StoppingCriteriaList([_StopWhenCancelled(cancelled)]))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids, new = body["prompt"], int(body["max_tokens"])
        if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
            return JSONResponse({"error": {"message": "prompt: token ids only"}}, status_code=400)

        async def events():
            cancelled, queue = threading.Event(), asyncio.Queue()
            try:
                async with one_at_a_time:
                    if await request.is_disconnected():     # gave up while queued
                        return
                    loop = asyncio.get_running_loop()
                    work = loop.run_in_executor(None, generate, ids, new, _TokenQueue(loop, queue, cancelled),
                                                cancelled)
                    while (token := await queue.get()) is not None:
                        chunk = {"object": "text_completion", "choices": [
                            {"index": 0, "text": "", "token_ids": [token], "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    await work
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()                 # the client left: stop generating for it

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a HF model directory")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    uvicorn.run(create_app(model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
