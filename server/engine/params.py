"""Per-request sampling settings (SPEC §9.1), validated before a request is queued, and the model's
defaults from its ``generation_config.json``.

Every field left ``None`` is "not given": :meth:`SamplingParams.resolved` fills it from the model's
generation config, then from the built-in default. A bad value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = ["MAX_LOGIT_BIAS", "MAX_N", "MAX_TOP_LOGPROBS", "SamplingParams", "generation_defaults"]

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_STOPS, MAX_STOP_CHARS = 8, 256
_MAX_INT = 2**31 - 1

# built-in values of the fields that may come from the model's generation config
_BUILTIN: dict[str, Any] = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_range(name: str, v: Any, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    ok = _is_int(v) if integer else _is_num(v)
    if not ok or v > hi or v < lo or (lo_open and v == lo):
        kind = "an integer" if integer else "a finite number"
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        hi_s = "" if hi == math.inf else f" and <= {hi}"
        raise ValueError(f"{name} must be {kind} {lo_s}{hi_s}, got {v!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. ``temperature == 0`` is greedy; ``top_k == 0`` means no limit.

    Penalties follow OpenAI (``presence_penalty``, ``frequency_penalty`` over generated tokens:
    ``l -= frequency * count + presence * (count > 0)``) and HF/CTRL (``repetition_penalty`` over prompt
    and generated tokens: ``l = l / p if l > 0 else l * p``). ``logit_bias`` maps token id -> bias added
    to its logit. ``min_tokens``: neither EOS nor a stop string ends the output before that many tokens.
    ``logprobs``: return the sampled token's log-probability (``top_logprobs`` alternatives too),
    from ``log_softmax`` of the model's float32 logits. ``n``: that many samples sharing one prefill;
    with a ``seed`` sample i uses ``seed + i``.
    """

    max_new_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        _check_range("max_new_tokens", self.max_new_tokens, 1, math.inf, integer=True)  # engine: the cap
        if self.temperature is not None:
            _check_range("temperature", self.temperature, 0.0, 100.0)
        if self.top_p is not None:
            _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k is not None:
            _check_range("top_k", self.top_k, 0, _MAX_INT, integer=True)
        if self.min_p is not None:
            _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_range("seed", self.seed, 0, 2**63 - 1, integer=True)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOPS or any(
            not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stop
        ):
            raise ValueError(
                f"stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters"
            )
        object.__setattr__(self, "stop", stop)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.repetition_penalty is not None:
            _check_range("repetition_penalty", self.repetition_penalty, 0.0, 100.0, lo_open=True)
        self._check_logit_bias()
        _check_range("min_tokens", self.min_tokens, 0, self.max_new_tokens, integer=True)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")
        _check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, integer=True)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        _check_range("n", self.n, 1, MAX_N, integer=True)

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if not isinstance(bias, Mapping):
            raise ValueError("logit_bias must map token ids to numbers")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        clean: dict[int, float] = {}
        for k, v in bias.items():
            tok = int(k) if isinstance(k, str) and k.isdigit() else k
            _check_range("logit_bias token id", tok, 0, _MAX_INT, integer=True)
            _check_range(f"logit_bias[{tok}]", v, -100.0, 100.0)
            clean[tok] = float(v)
        object.__setattr__(self, "logit_bias", clean)

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def resolved(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """A copy with every unset field filled: from ``defaults`` (the model's), else built-in."""
        defaults = defaults or {}
        fill = {
            f.name: defaults.get(f.name, _BUILTIN[f.name])
            for f in fields(self)
            if f.name in _BUILTIN and getattr(self, f.name) is None
        }
        return replace(self, **fill) if fill else self


def generation_defaults(generation_config: Any) -> dict[str, Any]:
    """Sampling defaults a model's ``generation_config.json`` sets (values it leaves unset are absent).

    ``temperature``, ``top_p``, ``top_k`` and ``min_p`` apply only when it asks for sampling
    (``do_sample: true``; then ``temperature`` defaults to 1); ``repetition_penalty`` applies always.
    """
    if generation_config is None:
        return {}
    out: dict[str, Any] = {}
    if getattr(generation_config, "do_sample", None):
        out["temperature"] = getattr(generation_config, "temperature", None) or 1.0
        for name in ("top_p", "top_k", "min_p"):
            value = getattr(generation_config, name, None)
            if value is not None:
                out[name] = value
    rep = getattr(generation_config, "repetition_penalty", None)
    if rep is not None:
        out["repetition_penalty"] = rep
    SamplingParams(**out)  # the model's own values must be valid too
    return out
