"""Pydantic request bodies of the HTTP API (SPEC §6). Pydantic lives only here, at the HTTP edge."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "GenerateRequest",
    "Message",
    "ProfileBody",
    "SteeringBody",
    "VectorEntry",
]


class VectorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=140)
    strength: float = 1.0
    layers: list[int] | None = Field(default=None, max_length=1024)
    positions: Literal["all", "prompt", "generated"] = "all"


class SteeringBody(BaseModel):
    """``{"vectors": [...]}``: an inline steering profile."""

    model_config = ConfigDict(extra="forbid")
    vectors: list[VectorEntry] = Field(default_factory=list, max_length=64)


class ProfileBody(SteeringBody):
    """Body of ``PUT /v1/profiles/{name}``."""

    description: str | None = Field(default=None, max_length=4096)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text (OpenAI content parts of type ``text`` are joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


Steering = str | SteeringBody | None
Stop = str | list[str] | None


class _Sampling(BaseModel):
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Stop = None
    stream: bool = False
    steering: Steering = None


class GenerateRequest(_Sampling):
    """``POST /generate``: exactly one of ``prompt`` or ``messages``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=1024)
    max_new_tokens: int = Field(default=128, ge=1)


class _OpenAIBase(_Sampling):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(default=1, ge=1)
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class ChatCompletionRequest(_OpenAIBase):
    """``POST /v1/chat/completions`` (the subset of OpenAI's body that applies)."""

    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_OpenAIBase):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
