"""The records the trainers learn from: preference pairs (RAHF) and instructions (RED).

* :class:`PreferencePair` - a conversation prefix (the prompt, a list of ``{"role", "content"}``
  messages ending with a user turn) plus the chosen and the rejected final assistant reply (strings);
* :class:`Instruction` - the prompt messages plus the target assistant reply.

Every loader (:mod:`training.loaders`) returns lists of these, whatever the file format.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ROLES",
    "Instruction",
    "Message",
    "PreferencePair",
    "pairs_to_instructions",
    "prompt_key",
    "user_turn",
]

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``."""

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""Message roles accepted in prompts."""


def user_turn(text: str) -> list[Message]:
    """A prompt of one user message."""
    return [{"role": "user", "content": text}]


def _check_prompt(prompt: list[Message]) -> None:
    if not prompt:
        raise ValueError("prompt must hold at least one message")
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"prompt[{i}] must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES or not isinstance(message["content"], str):
            raise ValueError(f"prompt[{i}] has an invalid role or content: {message!r}")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"prompt must end with a user message, not {prompt[-1]['role']!r}")


@dataclass
class PreferencePair:
    """A prompt (conversation prefix) with a preferred and a dispreferred final assistant reply.

    ``prompt`` is a list of ``{"role", "content"}`` messages ending with a user turn; a plain string is
    accepted and becomes a single user message. ``chosen`` and ``rejected`` are the reply texts.
    """

    prompt: list[Message]
    chosen: str
    rejected: str

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str):
            self.prompt = user_turn(self.prompt)
        _check_prompt(self.prompt)
        if not isinstance(self.chosen, str) or not isinstance(self.rejected, str):
            raise ValueError("chosen and rejected must be strings")

    def chosen_messages(self) -> list[Message]:
        """The prompt followed by the chosen reply as an assistant message."""
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    def rejected_messages(self) -> list[Message]:
        """The prompt followed by the rejected reply as an assistant message."""
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]


@dataclass
class Instruction:
    """Prompt messages (ending with a user turn) and the target assistant reply.

    A plain string for ``messages_prompt`` is accepted and becomes a single user message.
    """

    messages_prompt: list[Message]
    response: str

    def __post_init__(self) -> None:
        if isinstance(self.messages_prompt, str):
            self.messages_prompt = user_turn(self.messages_prompt)
        _check_prompt(self.messages_prompt)
        if not isinstance(self.response, str):
            raise ValueError("response must be a string")

    @property
    def prompt(self) -> list[Message]:
        """Alias of ``messages_prompt`` (the same name as :attr:`PreferencePair.prompt`)."""
        return self.messages_prompt

    def messages(self) -> list[Message]:
        """The prompt followed by the response as an assistant message."""
        return [*self.messages_prompt, {"role": "assistant", "content": self.response}]


def prompt_key(item: PreferencePair | Instruction) -> tuple[tuple[str, str], ...]:
    """A hashable key of an item's prompt messages, e.g. to dedupe or to keep splits disjoint."""
    return tuple((m["role"], m["content"]) for m in item.prompt)


def pairs_to_instructions(
    pairs: Iterable[PreferencePair], which: Literal["chosen", "rejected"] = "chosen"
) -> list[Instruction]:
    """Instructions that answer each pair's prompt with its chosen (or rejected) reply.

    RAHF-Dual fine-tunes one model on the chosen and one on the rejected replies of the same pairs.
    """
    if which not in ("chosen", "rejected"):
        raise ValueError(f"which must be 'chosen' or 'rejected', not {which!r}")
    return [Instruction([dict(m) for m in p.prompt], getattr(p, which)) for p in pairs]
