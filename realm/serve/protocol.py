"""OpenAI's request and response shapes, as far as realm serves them (pydantic models: the OpenAPI schema comes
from these).

A request field realm does not implement is refused (400 naming it) unless it has the value that means "off" (n=1,
presence_penalty=0, logprobs null, ...): nothing a client asks for is silently ignored. realm's own sampling fields
(top_k, min_p, repetition_penalty, ignore_eos) and speculative decoding ride along as extra fields (the openai
client's `extra_body`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from realm.runtime.generate import Completion, FinishReason
from realm.runtime.sampling import SamplingParams

# (field, the values that mean it is off): accepted at those values only
_INERT = {"n": (None, 1), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
          "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
          "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None,),
          "parallel_tool_calls": (None,), "user": None, "store": (None, False), "metadata": None,
          "service_tier": (None, "auto", "default")}


class UnsupportedField(ValueError):
    def __init__(self, name: str, value: Any):
        super().__init__(f"{name}={value!r} is not supported by this server")
        self.param = name


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # realm's own
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool | None = None
    speculative: str | dict[str, Any] | None = Field(None, description="realm: 'ngram', 'draft', 'none' or a "
                                                     "SpeculativeConfig's fields")
    # accepted at their "off" values only (see _INERT)
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_inert(self) -> None:
        for name, allowed in _INERT.items():
            value = getattr(self, name, None)
            if allowed is not None and value not in allowed:
                raise UnsupportedField(name, value)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams (ValueError naming a bad value)."""
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "without stream=true")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        values = {"max_tokens": self.token_limit() or default_max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": stop,
                  "ignore_eos": self.ignore_eos, "speculative": self.speculative}
        # OpenAI's default temperature is 1; a request that leaves it out samples, as with OpenAI
        values["temperature"] = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(description="one prompt: text, token ids, or a list of one text")

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise UnsupportedField("prompt", f"a list of {len(p)} prompts (one per request)")
            return p[0]
        if isinstance(p, list) and not p:
            raise UnsupportedField("prompt", [])
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def token_limit(self) -> int | None:
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise UnsupportedField("max_tokens", f"{self.max_tokens} besides max_completion_tokens="
                                   f"{self.max_completion_tokens}")
        return self.max_completion_tokens or self.max_tokens


# ---- responses ---------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage(completion: Completion) -> dict:
    prompt, generated = len(completion.prompt_ids), len(completion.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_body(rid: str, model: str, completion: Completion) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": completion.text, "logprobs": None,
                         "finish_reason": finish_reason(completion.finish_reason)}],
            "usage": usage(completion)}


def chat_body(rid: str, model: str, completion: Completion) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason(completion.finish_reason)}],
            "usage": usage(completion)}


def completion_chunk(rid: str, model: str, created: int, text: str | None, reason: str | None,
                     with_usage: bool) -> dict:
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            **({"usage": None} if with_usage else {})}


def chat_chunk(rid: str, model: str, created: int, delta: dict, reason: str | None, with_usage: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            **({"usage": None} if with_usage else {})}


def usage_chunk(rid: str, model: str, created: int, obj: str, completion: Completion) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(completion)}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
