"""`zerojax serve MODEL`: load and warm up the engine, then run uvicorn until a signal.

uvicorn owns SIGTERM/SIGINT: it stops accepting connections and waits for the open ones
(streams included) up to `--drain-timeout` seconds; then the app's shutdown stops the
engine loop and the command exits 0. `/health` answers once the engine is warm, because
the port opens only after warm-up. One access-log line per request, nothing per token.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import sys

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a zerojax run directory (holding 'latest') or a Hugging Face directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model name clients send (default: MODEL's basename)")
    parser.add_argument("--api-key", default=os.environ.get("ZEROJAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $ZEROJAX_API_KEY)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests accepted and unfinished (waiting + running) before 429s")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--tag", help="serve this checkpoint tag instead of 'latest'")
    parser.add_argument("--dtype", help="serving dtype (default: the weights' stored dtype)")
    parser.add_argument("--page-size", type=int)
    parser.add_argument("--num-pages", type=int)
    parser.add_argument("--token-budget", type=int)
    parser.add_argument("--max-seqs", type=int)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--kernels", default="auto", choices=["auto", "xla", "pallas"])
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


def serve(args: argparse.Namespace) -> int:
    for name in ("max_queue", "tensor_parallel", "port", "max_model_len", "page_size", "num_pages",
                 "token_budget", "max_seqs"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"{args.model} does not exist (give a zerojax run directory or a HF directory)")
    import uvicorn

    from zerojax import inference
    from zerojax.serve import protocol
    from zerojax.serve.app import ServerConfig, create_app

    if not _is_loopback(args.host) and not args.api_key:
        print(f"zerojax serve: warning: binding {args.host} without --api-key: anyone who can reach this port "
              f"can use the model", file=sys.stderr, flush=True)
    pipe = inference.pipeline(args.model, tensor_parallel=args.tensor_parallel, tag=args.tag, dtype=args.dtype,
                              page_size=args.page_size, num_pages=args.num_pages, token_budget=args.token_budget,
                              max_seqs=args.max_seqs, max_context=args.max_model_len,
                              prefix_caching=not args.no_prefix_caching, kernels=args.kernels)
    hf_dir = args.model if os.path.exists(os.path.join(args.model, "config.json")) else None
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    config = ServerConfig(served_model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                          drain_timeout=args.drain_timeout, chat_render=protocol.chat_renderer(hf_dir))
    app = create_app(pipe.engine, config)
    engine = pipe.engine
    print(f"zerojax serve: {name} on http://{args.host}:{args.port} (context {engine.max_context}, "
          f"{engine.num_pages} KV pages of {engine.page_size} tokens, token budget {engine.token_budget}, "
          f"max {engine.max_seqs} sequences)", flush=True)
    server = _DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=True,
                                            timeout_graceful_shutdown=args.drain_timeout))
    server.run()
    return 0


class _DrainingServer:
    """uvicorn's Server, except that a SIGTERM/SIGINT that drained cleanly exits 0: uvicorn
    re-raises the captured signal after shutdown, which would end the process by it."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)
        return Server(config)
