"""The one engine loop: a thread that owns the inference engine (and so the device).

HTTP handlers never touch the engine. They `submit` a request (which returns an asyncio
queue of that request's `RequestOutput`s) and `abort` it; the thread takes those commands
between steps, runs `engine.step()` while anything is unfinished, and hands each output to
its request's queue on the handler's event loop. Admission is bounded: at most
`max_queue` requests accepted and not yet finished (waiting + running); beyond it
`submit` raises `QueueFull` (the route answers 429). Nothing accepted is dropped: a
request leaves only by finishing or by its client going away (`abort`).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

from zerojax.inference.engine import InferenceEngine
from zerojax.inference.sampling import SamplingParams
from zerojax.serve.metrics import Metrics


class QueueFull(Exception):
    pass


class EngineDown(RuntimeError):
    """The engine thread has died (a bug or a device fault): nothing more can be served."""


class Failed:
    """Put on a request's queue when it cannot be served: the engine refused it (a
    ValueError: the client's fault, `status` 400) or the engine thread died (503)."""

    def __init__(self, request_id: str, error: Exception, status: int = 400):
        self.request_id, self.error, self.status = request_id, error, status


class EngineLoop:
    def __init__(self, engine: InferenceEngine, *, max_queue: int = 256, metrics: Metrics | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = metrics or Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._accepted = 0
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, float]] = {}
        self._first_token: dict[str, float] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="zerojax-engine", daemon=True)
        self.error: BaseException | None = None
        self.metrics.refresh(engine.stats())

    # ---- handler side (event loop threads)
    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]]) -> asyncio.Queue:
        """Accept all of `requests` (request_id, prompt ids, params) or none: one HTTP request's
        sequences. Their outputs, each tagged with its request_id, arrive on the returned queue."""
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:                # the engine thread's death takes this lock too: no add is lost
            if self.error is not None:
                raise EngineDown(f"the engine loop stopped: {self.error!r}")
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._accepted + len(requests) > self.max_queue:
                raise QueueFull(f"{self._accepted} requests are already waiting or running; {len(requests)} more "
                                f"exceed max_queue {self.max_queue}")
            self._accepted += len(requests)
            for request_id, prompt, params in requests:
                self._commands.put(("add", request_id, prompt, params, loop, out))
        self._wake.set()
        return out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    @property
    def accepted(self) -> int:
        return self._accepted

    def stop(self, timeout: float) -> bool:
        """Stop accepting, let the accepted requests finish (up to `timeout` s), end the thread.
        True when everything accepted finished."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while self._accepted and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        drained = self._accepted == 0
        self._commands.put(("quit",))
        self._wake.set()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        return drained

    # ---- the engine thread
    def _run(self) -> None:
        try:
            while True:
                if not self._take_commands():
                    return
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:          # a bug: fail every open request rather than hang them
            with self._lock:
                self.error = e
            down = EngineDown(f"the engine loop stopped: {e!r}")
            while True:                     # adds not taken yet: routed only to be failed
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "add":
                    _, request_id, _, _, loop, out = command
                    self._routes[request_id] = (loop, out, time.perf_counter())
            for request_id in list(self._routes):
                self._deliver(request_id, Failed(request_id, down, status=503))
                self._forget(request_id)
            raise

    def _take_commands(self) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "quit":
                return False
            if command[0] == "add":
                _, request_id, prompt, params, loop, out = command
                self._routes[request_id] = (loop, out, time.perf_counter())
                try:
                    self.engine.add_request(prompt, params, request_id=request_id)
                except ValueError as e:
                    self._deliver(request_id, Failed(request_id, e))
                    self._forget(request_id)
                    continue
                self.metrics.prompt_tokens.inc(len(prompt))
                if self.engine.requests[request_id].finished:          # max_new 0: nothing to run
                    self._finish(request_id)
            elif command[0] == "abort":
                request_id = command[1]
                if request_id in self._routes:
                    self.engine.abort(request_id)
                    self.engine.release(request_id)
                    self._forget(request_id)
                    self.metrics.aborted.inc()

    def _step(self) -> None:
        events = self.engine.step()
        now = time.perf_counter()
        for out in events:
            if out.request_id not in self._routes:
                continue
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            started = self._routes[out.request_id][2]
            if out.request_id not in self._first_token:
                self._first_token[out.request_id] = now
                self.metrics.ttft.observe(now - started)
            if out.finished:
                tokens = len(out.token_ids)
                if tokens > 1:
                    self.metrics.tpot.observe((now - self._first_token[out.request_id]) / (tokens - 1))
                self.engine.release(out.request_id)
            self._deliver(out.request_id, out)
            if out.finished:
                self._forget(out.request_id)
        self.metrics.refresh(self.engine.stats())

    def _finish(self, request_id: str) -> None:
        self._deliver(request_id, self.engine.release(request_id))
        self._forget(request_id)

    def _deliver(self, request_id: str, item: Any) -> None:
        loop, out, _ = self._routes[request_id]
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:                # the handler's loop is closed: nobody is listening
            pass

    def _forget(self, request_id: str) -> None:
        self._routes.pop(request_id, None)
        self._first_token.pop(request_id, None)
        with self._lock:
            self._accepted -= 1
        self.metrics.refresh(self.engine.stats())
