"""OpenAI request bodies in, validated generation requests out; errors in OpenAI's shape.

Every field of `/v1/completions` and `/v1/chat/completions` the server understands is
listed below; a field OpenAI defines that the server does not implement is a 400 naming
it, and so is any other unknown field, so nothing a client asks for is silently ignored.
A JSON `null` means "not given". Defaults are `inference.pipeline`'s (MII's): no
`max_tokens` means up to the context, `temperature` 1.0 with `top_p` 0.9, so a greedy
answer equals the offline pipeline's.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from zerojax.inference.sampling import MAX_STOP_IDS, SamplingParams


class APIError(Exception):
    """An error response: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "stream_options", "presence_penalty", "frequency_penalty", "user",
          # vLLM's extensions, same names
          "min_tokens", "repetition_penalty", "ignore_eos", "stop_token_ids"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs"}
# OpenAI fields a client may send that this server does not implement: named in the 400.
UNSUPPORTED = {"best_of", "logit_bias", "suffix", "tools", "tool_choice", "functions", "function_call",
               "response_format", "parallel_tool_calls", "audio", "modalities", "prediction", "store",
               "metadata", "service_level", "service_tier", "reasoning_effort", "web_search_options"}
MAX_N = 16


@dataclasses.dataclass
class GenerationRequest:
    """What one HTTP request asks the engine for."""

    prompts: list[list[int]]            # token ids, one list per prompt
    prompt_texts: list[str | None]      # for `echo`
    params: SamplingParams              # n included; the route expands it
    stream: bool
    include_usage: bool
    logprobs: int | None                # top-N per token, None: off
    echo: bool
    chat: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_fields(body: dict, allowed: set[str]) -> dict:
    given = {k: v for k, v in body.items() if v is not None}
    for key in sorted(given):
        if key in UNSUPPORTED:
            raise APIError(400, f"parameter {key!r} is not supported by this server", key, "unsupported_parameter")
        if key not in allowed:
            raise APIError(400, f"unknown parameter {key!r}", key, "unknown_parameter")
    return given


def _int(body, key, lo=None, hi=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{key} must be an integer, got {json.dumps(value)}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(400, f"{key} must be {bounds}, got {value}", key)
    return value


def _num(body, key, lo, hi, *, open_low=False):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number, got {json.dumps(value)}", key)
    if value < lo or value > hi or (open_low and value == lo):
        raise APIError(400, f"{key} must be in {'(' if open_low else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _bool(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, got {json.dumps(value)}", key)
    return bool(value)


def _stop(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return tuple(stop)


def _stop_ids(body) -> tuple[int, ...]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) \
            or len(ids) >= MAX_STOP_IDS:
        raise APIError(400, f"stop_token_ids must be a list of at most {MAX_STOP_IDS - 1} ids >= 0",
                       "stop_token_ids")
    return tuple(ids)


def sampling_params(body: dict, logprobs: int | None) -> SamplingParams:
    max_tokens = _int(body, "max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", lo=1)
    temperature = _num(body, "temperature", 0.0, 2.0)
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": temperature,
                              "n": _int(body, "n", lo=1, hi=MAX_N) or 1, "seed": _int(body, "seed"),
                              "stop": _stop(body), "stop_token_ids": _stop_ids(body),
                              "ignore_eos": _bool(body, "ignore_eos"), "logprobs": logprobs,
                              "min_new_tokens": _int(body, "min_tokens", lo=0) or 0}
    for key, name, lo, hi, open_low in (("top_p", "top_p", 0.0, 1.0, True),
                                        ("presence_penalty", "presence_penalty", -2.0, 2.0, False),
                                        ("frequency_penalty", "frequency_penalty", -2.0, 2.0, False),
                                        ("repetition_penalty", "repetition_penalty", 0.0, 10.0, True)):
        value = _num(body, key, lo, hi, open_low=open_low)
        if value is not None:
            kwargs[name] = value
    top_k = _int(body, "top_k", lo=-1)
    if top_k is not None:
        kwargs["top_k"] = None if top_k <= 0 else top_k            # vLLM: -1 (or 0) = off
    if kwargs["seed"] is not None:
        kwargs["seed"] &= 0x7FFFFFFF
    try:
        return SamplingParams.create(**kwargs)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options takes only include_usage", "stream_options")
    return _bool(options, "include_usage")


def _prompts(value, encode, vocab: int) -> tuple[list[list[int]], list[str | None]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of ids, a list of id lists."""
    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    if isinstance(value, str):
        items = [value]
    elif ids_ok(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or ids_ok(p) for p in value):
        items = value
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such "
                            "lists (none empty)", "prompt")
    prompts, texts = [], []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "the prompt is empty", "prompt")
            prompts.append(encode(item))
            texts.append(item)
        else:
            bad = [i for i in item if not 0 <= i < vocab]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
            prompts.append(list(item))
            texts.append(None)
    return prompts, texts


def parse_completion(body: dict, *, encode, vocab: int) -> GenerationRequest:
    body = check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise APIError(400, "prompt is required", "prompt")
    prompts, texts = _prompts(body["prompt"], encode, vocab)
    logprobs = _int(body, "logprobs", lo=0, hi=20)
    echo = _bool(body, "echo")
    if echo and logprobs is not None:
        raise APIError(400, "echo with logprobs (log-probs of the prompt) is not supported", "echo",
                       "unsupported_parameter")
    return GenerationRequest(prompts, texts, sampling_params(body, logprobs), _bool(body, "stream"),
                             _stream_options(body), logprobs, echo, chat=False)


def parse_chat(body: dict, *, render, encode) -> GenerationRequest:
    body = check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string role", "messages")
        content = message.get("content")
        if isinstance(content, list):          # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        clean.append({"role": message["role"], "content": content})
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", lo=0, hi=20)
    if top is not None and not want_logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    text = render(clean)
    if not text:
        raise APIError(400, "the rendered chat prompt is empty", "messages")
    logprobs = (top or 0) if want_logprobs else None
    return GenerationRequest([encode(text)], [text], sampling_params(body, logprobs), _bool(body, "stream"),
                             _stream_options(body), logprobs, False, chat=True)


def check_lengths(request: GenerationRequest, max_context: int) -> None:
    """400 for a prompt that does not fit, or a `max_tokens` beyond the room it leaves."""
    for ids in request.prompts:
        if len(ids) >= max_context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {max_context} tokens "
                                f"(at least one new token must fit)", "prompt" if not request.chat else "messages",
                           "context_length_exceeded")
        asked = request.params.max_new_tokens
        if asked is not None and len(ids) + asked > max_context:
            raise APIError(400, f"max_tokens {asked} + {len(ids)} prompt tokens exceeds this model's context of "
                                f"{max_context} tokens", "max_tokens", "context_length_exceeded")


PLAIN_TEMPLATE = "one line per message, '{role}: {content}\\n', then 'assistant:'"


def plain_chat(messages: list[dict]) -> str:
    """The chat template of a model without one: one line per message, then the reply's cue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_renderer(directory: str | None):
    """The HF chat template of `directory`, rendered with jinja2 as transformers does
    (generation prompt added), else `plain_chat`. The template is where transformers saves
    it: `chat_template.jinja` (since 4.43), else `chat_template` in tokenizer_config.json."""
    import os
    config_path = os.path.join(directory, "tokenizer_config.json") if directory else None
    config = {}
    if config_path and os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):      # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_path = os.path.join(directory, "chat_template.jinja") if directory else None
    if jinja_path and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    if not isinstance(template, str):
        return plain_chat
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise APIError(400, f"the model's chat template refused the messages: {message}", "messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    token = lambda v: v.get("content") if isinstance(v, dict) else (v or "")
    specials = {"bos_token": token(config.get("bos_token")), "eos_token": token(config.get("eos_token"))}

    def render(messages: list[dict]) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=True, **specials)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the model's chat template failed on these messages: {e}", "messages") from None
    return render
