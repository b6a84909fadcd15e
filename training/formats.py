"""The file formats of training data: parsing one row into a record, and telling formats apart.

Formats (the loaders' ``format=`` argument; ``"auto"`` detects them from the first row, see
:func:`detect_format`):

* ``"hh-rlhf"`` - Anthropic HH-RLHF: ``chosen`` and ``rejected`` are whole transcripts made of
  ``"\\n\\nHuman: ..."`` and ``"\\n\\nAssistant: ..."`` turns. Everything before the last
  ``"\\n\\nAssistant:"`` is the shared prompt (parsed into messages); the text after it is the reply.
* ``"ultrafeedback"`` - UltraFeedback-binarized and other chat-message preference data: ``chosen`` and
  ``rejected`` are message lists whose last message is the assistant reply. Their shared earlier
  messages are the prompt; when the lists hold only the reply, the ``prompt`` field (a string or a
  message list) is the prompt.
* ``"jsonl"`` - plain rows. Preferences: ``prompt`` (a string or a message list), ``chosen`` and
  ``rejected`` (strings). Instructions: ``prompt`` and ``response``, or ``messages`` whose last message is
  the assistant reply.

Problems raise :class:`DataFormatError` naming the source, the 1-based row (the line number in a JSONL
file) and the field, e.g. ``data.jsonl row 17: missing field 'rejected'``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from .records import ROLES, Instruction, Message, PreferencePair, user_turn

__all__ = [
    "FORMATS",
    "DataFormatError",
    "FieldError",
    "detect_format",
    "row_parser",
    "type_name",
]

FORMATS: tuple[str, ...] = ("hh-rlhf", "ultrafeedback", "jsonl")
"""Names accepted by ``format=`` (besides ``"auto"``)."""

_HH_HUMAN = "\n\nHuman:"
_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class DataFormatError(ValueError):
    """Invalid or unreadable training data.

    The message starts with the source and the 1-based row when they are known, e.g.
    ``data.jsonl row 17: missing field 'rejected'``; they are also kept as ``source``, ``row`` and
    ``field`` (``None`` when not applicable).
    """

    def __init__(
        self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.reason = message
        where = " ".join(p for p in (source, f"row {row}" if row is not None else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class FieldError(Exception):
    """Raised by the row parsers (naming the ``field``); the loader adds the source and row and
    re-raises a :class:`DataFormatError`."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _missing(field: str) -> FieldError:
    return FieldError(field, f"missing field {field!r}")


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type (``object``, ``list``, ``string``, ``null``), else Python's."""
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Field parsing
# --------------------------------------------------------------------------------------------------


def _get(row: Mapping[str, Any], field: str) -> Any:
    if field not in row or row[field] is None:
        raise _missing(field)
    return row[field]


def _text(row: Mapping[str, Any], field: str) -> str:
    value = _get(row, field)
    if not isinstance(value, str):
        raise FieldError(field, f"field {field!r} must be a string, got {type_name(value)}")
    if not value.strip():
        raise FieldError(field, f"field {field!r} is empty")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    """Validate a message list; returns copies holding only ``role`` and ``content``."""
    if not isinstance(value, list):
        raise FieldError(field, f"field {field!r} must be a list of messages, got {type_name(value)}")
    if not value:
        raise FieldError(field, f"field {field!r} is an empty list of messages")
    out: list[Message] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise FieldError(where, f"field {where!r} must be a message object, got {type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _missing(f"{where}.{key}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise FieldError(
                f"{where}.role", f"field '{where}.role' must be one of {list(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise FieldError(
                f"{where}.content", f"field '{where}.content' must be a string, got {type_name(content)}"
            )
        out.append({"role": role, "content": content})
    return out


def _prompt(row: Mapping[str, Any], field: str = "prompt") -> list[Message]:
    """A prompt given as a string (one user message) or as a message list ending with a user turn."""
    value = _get(row, field)
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, f"field {field!r} is empty")
        return user_turn(value)
    if isinstance(value, list):
        messages = _messages(value, field)
        _ends_with_user(messages, field)
        return messages
    raise FieldError(field, f"field {field!r} must be a string or a list of messages, got {type_name(value)}")


def _ends_with_user(messages: list[Message], field: str) -> None:
    if messages[-1]["role"] != "user":
        raise FieldError(
            field, f"the prompt in field {field!r} must end with a user message, not {messages[-1]['role']!r}"
        )


def _reply(messages: list[Message], field: str) -> str:
    last = messages[-1]
    where = f"{field}[{len(messages) - 1}]"
    if last["role"] != "assistant":
        raise FieldError(
            f"{where}.role",
            f"the last message of field {field!r} must be from the assistant, not {last['role']!r}",
        )
    if not last["content"].strip():
        raise FieldError(f"{where}.content", f"the assistant reply in field {field!r} is empty")
    return last["content"]


# --------------------------------------------------------------------------------------------------
# Row parsers
# --------------------------------------------------------------------------------------------------


def _hh_split(transcript: str, field: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prefix up to the last Assistant turn, reply text)."""
    cut = transcript.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise FieldError(field, f"field {field!r} has no '\\n\\nAssistant:' turn")
    reply = transcript[cut + len(_HH_ASSISTANT) :].strip()
    if not reply:
        raise FieldError(field, f"the final assistant reply in field {field!r} is empty")
    return transcript[:cut], reply


def _hh_messages(prefix: str, field: str) -> list[Message]:
    """Parse ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` turns into messages."""
    parts = _HH_TURN.split(prefix)
    lead, turns = parts[0], parts[1:]
    if lead.strip():
        raise FieldError(field, f"field {field!r} has text before its first 'Human:' turn: {lead[:40]!r}")
    if not turns:
        raise FieldError(field, f"field {field!r} has no 'Human:' turn before the final reply")
    pairs = zip(turns[::2], turns[1::2], strict=True)
    messages = [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in pairs]
    if messages[-1]["role"] != "user":
        raise FieldError(field, f"field {field!r} has no 'Human:' turn right before the final reply")
    return messages


def _pref_hh(row: Mapping[str, Any]) -> PreferencePair:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    prefix, chosen_reply = _hh_split(chosen, "chosen")
    prefix_rejected, rejected_reply = _hh_split(rejected, "rejected")
    if prefix_rejected != prefix:
        raise FieldError(
            "rejected", "the conversation before the final reply differs between 'chosen' and 'rejected'"
        )
    return PreferencePair(_hh_messages(prefix, "chosen"), chosen_reply, rejected_reply)


def _pref_chat(row: Mapping[str, Any]) -> PreferencePair:
    chosen = _messages(_get(row, "chosen"), "chosen")
    rejected = _messages(_get(row, "rejected"), "rejected")
    chosen_reply, rejected_reply = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise FieldError(
            "rejected", "the messages before the final reply differ between 'chosen' and 'rejected'"
        )
    if chosen[:-1]:
        prompt = chosen[:-1]
        _ends_with_user(prompt, "chosen")
    else:
        prompt = _prompt(row)
    return PreferencePair(prompt, chosen_reply, rejected_reply)


def _pref_jsonl(row: Mapping[str, Any]) -> PreferencePair:
    return PreferencePair(_prompt(row), _text(row, "chosen"), _text(row, "rejected"))


def _inst_jsonl(row: Mapping[str, Any]) -> Instruction:
    if "messages" in row and row["messages"] is not None:
        messages = _messages(row["messages"], "messages")
        response = _reply(messages, "messages")
        if len(messages) < 2:
            raise FieldError("messages", "field 'messages' holds only the assistant reply, no prompt")
        _ends_with_user(messages[:-1], "messages")
        return Instruction(messages[:-1], response)
    if "prompt" not in row:
        raise FieldError("prompt", "missing field 'prompt' (or 'messages')")
    return Instruction(_prompt(row), _text(row, "response"))


_PREFERENCE_PARSERS: dict[str, Callable[[Mapping[str, Any]], PreferencePair]] = {
    "hh-rlhf": _pref_hh,
    "ultrafeedback": _pref_chat,
    "jsonl": _pref_jsonl,
}


def row_parser(
    kind: Literal["preferences", "instructions"], format: str, *, source: str | None = None
) -> Callable[[Any], PreferencePair | Instruction]:
    """The function that parses one row of ``format`` into a record of ``kind``.

    It raises :class:`FieldError` for a row that is not a JSON object or has a missing or invalid
    field. Instructions exist only in the ``"jsonl"`` format: asking for them from preference data
    raises :class:`DataFormatError` (naming ``source``).
    """
    if kind == "preferences":
        parse = _PREFERENCE_PARSERS[format]
    elif format == "jsonl":
        parse = _inst_jsonl
    else:
        raise DataFormatError(
            f"holds preference data (format {format!r}), not instructions; use "
            "load_preferences, or pairs_to_instructions on its result",
            source=source,
        )

    def parse_row(row: Any) -> PreferencePair | Instruction:
        if not isinstance(row, Mapping):
            raise FieldError(None, f"expected a JSON object, got {type_name(row)}")
        return parse(row)

    return parse_row


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def _looks_like_hh(text: str) -> bool:
    return _HH_ASSISTANT in text and (_HH_HUMAN in text or text.startswith("Human:"))


def detect_format(rows: Iterable[Mapping[str, Any]], *, source: str | None = None) -> str:
    """Name the format of ``rows`` from the first row: ``"hh-rlhf"``, ``"ultrafeedback"`` or ``"jsonl"``.

    * ``chosen`` holding a message list -> ``"ultrafeedback"``;
    * ``chosen`` a transcript with ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns and no ``prompt`` ->
      ``"hh-rlhf"``;
    * ``prompt`` with string ``chosen``/``rejected``, or ``prompt``/``response``, or ``messages`` ->
      ``"jsonl"``.

    Raises :class:`DataFormatError` (naming ``source`` when given) if there is no row or the first row
    fits none of these.
    """
    first = next(iter(rows), None)
    if first is None:
        raise DataFormatError("no rows to detect the format from", source=source)
    if not isinstance(first, Mapping):
        raise DataFormatError(f"expected a JSON object, got {type_name(first)}", source=source, row=1)
    chosen = first.get("chosen")
    if isinstance(chosen, list):
        return "ultrafeedback"
    if isinstance(chosen, str) and "prompt" not in first and _looks_like_hh(chosen):
        return "hh-rlhf"
    if "prompt" in first or "messages" in first:
        return "jsonl"
    raise DataFormatError(
        f"cannot detect the data format from fields {sorted(first)}; expected HH-RLHF ('chosen'/'rejected' "
        "transcripts), UltraFeedback ('chosen'/'rejected' message lists), or plain JSONL "
        "('prompt' with 'chosen'/'rejected' or 'response', or 'messages')",
        source=source,
        row=1,
    )
