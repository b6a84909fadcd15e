"""Which OpenAI request parameters this server serves, refuses or ignores (SPEC §9.2).

Every documented OpenAI parameter either works or is refused with 400 naming it. The request models keep
fields they do not declare (``model_extra``); here each one is either

- a documented parameter this server does not serve (tools, response formats, logprobs, penalties...):
  accepted only with the value that asks for nothing (``tools: []``, ``response_format: {"type": "text"}``,
  ``presence_penalty: 0``...), refused with 400 otherwise;
- an identifier that does not change the output (``prompt_cache_key``, ``safety_identifier``): accepted;
- anything else: ignored, and named in a warning in the log (as vLLM does).

A parameter the request models declare (and so the engine serves) never reaches this table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

__all__ = ["check_messages", "check_openai_params"]

log = logging.getLogger("steerserve")


def _none(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _false(v: Any) -> bool:
    return v is None or v is False


def _zero(v: Any) -> bool:
    return v is None or (not isinstance(v, bool) and v == 0)


#: documented (or vLLM-standard) parameters not served here -> the values that ask for nothing
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "tools": _empty,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _empty,
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": _none,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logprobs": _false,
    "top_logprobs": _zero,
    "logit_bias": _empty,
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "suffix": lambda v: v is None or v == "",
    "store": _false,
    "metadata": _empty,
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _none,
    "prediction": _none,
    "reasoning_effort": _none,
    "verbosity": _none,
    "web_search_options": _none,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "min_p": _zero,
    "repetition_penalty": lambda v: v is None or v == 1,
    "min_tokens": _zero,
    "ignore_eos": _false,
    "use_beam_search": _false,
    "guided_json": _none,
    "guided_regex": _none,
    "guided_choice": _none,
    "guided_grammar": _none,
}
#: documented identifiers that do not change the output
_ACCEPTED = frozenset({"prompt_cache_key", "safety_identifier"})
#: message fields beyond role and content, refused unless empty
_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call", "audio", "refusal")


def _best_of(extra: dict[str, Any], n: int) -> None:
    best_of = extra.pop("best_of", None)
    if best_of is None or best_of == n:
        return
    if not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < n:
        raise ValueError(f"best_of must be an integer >= n ({n}), got {best_of!r}")
    raise ValueError(f"best_of > n is not supported (best_of={best_of}, n={n})")


def check_openai_params(body: BaseModel, request_id: str, n: int = 1) -> None:
    """Refuse (``ValueError`` naming it) a parameter of ``body`` this server does not serve; log the
    unknown ones as ignored."""
    extra = dict(body.model_extra or {})
    _best_of(extra, n)
    unknown = []
    for name, value in extra.items():
        if name in _ACCEPTED:
            continue
        if name not in _NEUTRAL:
            unknown.append(name)
        elif not _NEUTRAL[name](value):
            raise ValueError(f"parameter {name!r} is not supported by this server (got {value!r:.80})")
    if unknown:
        log.warning("request %s: ignoring unknown fields %s", request_id, ", ".join(sorted(unknown)))


def check_messages(messages: Iterable[BaseModel]) -> None:
    """Refuse message fields this server does not use (a participant ``name``, tool calls, audio...)."""
    for i, m in enumerate(messages):
        for name, value in (m.model_extra or {}).items():
            if name in _MESSAGE_FIELDS and not _empty(value) and value != "":
                raise ValueError(f"messages[{i}].{name} is not supported by this server")
