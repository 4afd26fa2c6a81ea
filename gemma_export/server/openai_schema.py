"""The OpenAI request bodies the server accepts, validated by hand into plain dataclasses.

Rules (as OpenAI's API and vLLM / llama-server behave): unknown fields are ignored; a
known field of the wrong type or out of range is a 400 naming the field (`param`);
`n` other than 1 is refused. JSON booleans are not numbers here (`"max_tokens": true` is
a type error). Token counts against the context are checked later, once the prompt is
tokenized (`check_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error with an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, what: str) -> ApiError:
    return ApiError(400, f"'{param}' {what}", param=param, code="invalid_value")


@dataclass(frozen=True)
class Sampling:
    """The generation fields shared by both endpoints."""

    max_tokens: int | None  # None = to the end of the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    repetition_penalty: float
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompt: str | list[int]
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict]  # {"role": "system" | "user" | "assistant", "content": str}
    sampling: Sampling


# -- field readers ------------------------------------------------------------------------------


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {v}")
    return v


def _num(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {type(v).__name__}")
    if v != v or v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"must be a boolean, got {type(v).__name__}")
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise _bad(name, f"must be a string, got {type(v).__name__}")
    return v


MAX_STOPS = 16


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise _bad("stop", f"must hold 1..{MAX_STOPS} non-empty strings")
    return tuple(stops)


def _sampling(body: dict, *, max_tokens_names: tuple[str, ...]) -> Sampling:
    n = _int(body, "n", 0, 1 << 30)
    if n is not None and n != 1:
        raise _bad("n", "other than 1 is not supported (one completion per request)")
    for name in ("logprobs", "echo", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise _bad(name, "is not supported by this server")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "other than 1 is not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise _bad(name, "is not supported by this server (use repetition_penalty)")
    max_tokens = None
    for name in max_tokens_names:  # the first one given wins (chat: max_completion_tokens)
        v = _int(body, name, 1, 1 << 30)
        if v is not None and max_tokens is None:
            max_tokens = v
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", f"must be an integer, got {type(seed).__name__}")
        seed %= 2**63  # OpenAI accepts any 64-bit integer, negative ones too
    top_k = _int(body, "top_k", -1, 1 << 30)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    include_usage = _bool(opts or {}, "include_usage")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=0 if top_k in (None, -1) else top_k,  # -1: vLLM's "off"
        seed=seed,
        stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"),
        repetition_penalty=_num(body, "repetition_penalty", 0.0, 100.0, 1.0, lo_open=True),
        stream=_bool(body, "stream"),
        include_usage=include_usage,
    )


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_completion(body: Any, vocab_size: int) -> CompletionRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad("prompt", "must be a string, or a non-empty list of token ids (one prompt per request)")
        if any(not 0 <= t < vocab_size for t in prompt):
            raise _bad("prompt", f"holds a token id outside [0, {vocab_size})")
    elif not isinstance(prompt, str):
        raise _bad("prompt", "is required: a string or a list of token ids")
    elif not prompt:
        raise _bad("prompt", "must not be empty")
    return CompletionRequest(_str(body, "model"), prompt, _sampling(body, max_tokens_names=("max_tokens",)))


_ROLES = ("system", "developer", "user", "assistant")


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "parts must be {\"type\": \"text\", \"text\": str}; "
                           "this model reads text only")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}")
        # Gemma 1-3 have no system role: their template folds a first system message into the
        # first user turn; Gemma 4 gives it a turn of its own (runtime.tokenizer.format_chat).
        # "developer" is OpenAI's new name.
        out.append({"role": "system" if role == "developer" else role, "content": _content(i, m.get("content"))})
    sampling = _sampling(body, max_tokens_names=("max_completion_tokens", "max_tokens"))
    return ChatRequest(_str(body, "model"), out, sampling)


def check_budget(prompt_tokens: int, max_tokens: int | None, context: int, param: str) -> int:
    """The number of tokens to generate; a 400 if the prompt (and max_tokens) exceed the context."""
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens",
                       param=param, code="context_length_exceeded")
    room = context - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} + the prompt's {prompt_tokens} tokens exceed this model's "
                       f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
    return max_tokens
