"""`zerojax serve`: an OpenAI-compatible server on the inference engine.

    app = serve.create_app(inference.pipeline("runs/tiny").engine, serve.ServerConfig("tiny"))

`create_app` gives the FastAPI app (routes in `app`, bodies and errors in `protocol`,
the one engine thread in `loop`, Prometheus text in `metrics`); `server.serve` is the
command: load, warm up, then uvicorn until SIGTERM/SIGINT drain it.
"""
from zerojax.serve.app import ServerConfig, create_app
from zerojax.serve.protocol import APIError

__all__ = ["APIError", "ServerConfig", "create_app"]
