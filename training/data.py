"""Training data for steerserve's offline methods: preference pairs (RAHF) and instructions (RED).

Every loader turns its input into two small dataclasses:

* :class:`PreferencePair` - a conversation prefix (the prompt, a list of ``{"role", "content"}``
  messages ending with a user turn) plus the chosen and the rejected final assistant reply (strings);
* :class:`Instruction` - the prompt messages plus the target assistant reply.

Formats (``format=`` argument; ``"auto"`` detects them from the first row, see :func:`detect_format`):

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

Sources: a ``.jsonl`` file (one JSON object per line; blank lines are skipped), a ``.json`` file (a list
of objects, or JSON Lines), a ``.parquet`` file (needs ``pyarrow``), or a folder written by the
``datasets`` package's ``save_to_disk`` (needs ``datasets``; read with ``load_from_disk``, so nothing is
ever downloaded). A ``DatasetDict`` folder takes ``split=``.

Problems raise :class:`DataFormatError` naming the source, the 1-based row (the line number in a JSONL
file) and the field, e.g. ``data.jsonl row 17: missing field 'rejected'``.

The shipped demo sets (see ``training/data/make_demo.py``, which generates them) are found with
:func:`demo_path`: ``tone_pref`` (preferences: warm and positive vs curt and negative replies) and
``signoff_inst`` (instructions: every reply ends with the line :data:`SIGNOFF`), each with a
``train`` and a ``test`` split whose prompts are disjoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "DEMO_DIR",
    "DEMO_SETS",
    "FORMATS",
    "ROLES",
    "SIGNOFF",
    "DataFormatError",
    "Instruction",
    "Message",
    "PreferencePair",
    "demo_path",
    "detect_format",
    "load_instructions",
    "load_preferences",
    "pairs_to_instructions",
    "prompt_key",
    "split_holdout",
]

log = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``."""

FORMATS: tuple[str, ...] = ("hh-rlhf", "ultrafeedback", "jsonl")
"""Names accepted by ``format=`` (besides ``"auto"``)."""

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""Message roles accepted in prompts."""

SIGNOFF = "\u2014 Steery"
"""The last line of every reply in the ``signoff_inst`` demo set (an em dash, a space, ``Steery``)."""

DEMO_DIR = Path(__file__).resolve().with_name("data")
"""Folder of the shipped demo data (package data of ``training``)."""

DEMO_SETS: dict[str, str] = {"tone_pref": "preferences", "signoff_inst": "instructions"}
"""Shipped demo sets and what they hold; each has ``<name>_train.jsonl`` and ``<name>_test.jsonl``."""

_HH_HUMAN = "\n\nHuman:"
_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_SUFFIXES = (".jsonl", ".json", ".parquet")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


def _user(text: str) -> list[Message]:
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
            self.prompt = _user(self.prompt)
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
            self.messages_prompt = _user(self.messages_prompt)
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


class _FieldError(Exception):
    """Raised by the row parsers; the loader adds the source and row and re-raises a DataFormatError."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _missing(field: str) -> _FieldError:
    return _FieldError(field, f"missing field {field!r}")


def _type_name(value: Any) -> str:
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
        raise _FieldError(field, f"field {field!r} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _FieldError(field, f"field {field!r} is empty")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    """Validate a message list; returns copies holding only ``role`` and ``content``."""
    if not isinstance(value, list):
        raise _FieldError(field, f"field {field!r} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise _FieldError(field, f"field {field!r} is an empty list of messages")
    out: list[Message] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise _FieldError(where, f"field {where!r} must be a message object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _missing(f"{where}.{key}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _FieldError(
                f"{where}.role", f"field '{where}.role' must be one of {list(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise _FieldError(
                f"{where}.content", f"field '{where}.content' must be a string, got {_type_name(content)}"
            )
        out.append({"role": role, "content": content})
    return out


def _prompt(row: Mapping[str, Any], field: str = "prompt") -> list[Message]:
    """A prompt given as a string (one user message) or as a message list ending with a user turn."""
    value = _get(row, field)
    if isinstance(value, str):
        if not value.strip():
            raise _FieldError(field, f"field {field!r} is empty")
        return _user(value)
    if isinstance(value, list):
        messages = _messages(value, field)
        _ends_with_user(messages, field)
        return messages
    raise _FieldError(
        field, f"field {field!r} must be a string or a list of messages, got {_type_name(value)}"
    )


def _ends_with_user(messages: list[Message], field: str) -> None:
    if messages[-1]["role"] != "user":
        raise _FieldError(
            field, f"the prompt in field {field!r} must end with a user message, not {messages[-1]['role']!r}"
        )


def _reply(messages: list[Message], field: str) -> str:
    last = messages[-1]
    where = f"{field}[{len(messages) - 1}]"
    if last["role"] != "assistant":
        raise _FieldError(
            f"{where}.role",
            f"the last message of field {field!r} must be from the assistant, not {last['role']!r}",
        )
    if not last["content"].strip():
        raise _FieldError(f"{where}.content", f"the assistant reply in field {field!r} is empty")
    return last["content"]


# --------------------------------------------------------------------------------------------------
# Row parsers
# --------------------------------------------------------------------------------------------------


def _hh_split(transcript: str, field: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prefix up to the last Assistant turn, reply text)."""
    cut = transcript.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise _FieldError(field, f"field {field!r} has no '\\n\\nAssistant:' turn")
    reply = transcript[cut + len(_HH_ASSISTANT) :].strip()
    if not reply:
        raise _FieldError(field, f"the final assistant reply in field {field!r} is empty")
    return transcript[:cut], reply


def _hh_messages(prefix: str, field: str) -> list[Message]:
    """Parse ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` turns into messages."""
    parts = _HH_TURN.split(prefix)
    lead, turns = parts[0], parts[1:]
    if lead.strip():
        raise _FieldError(field, f"field {field!r} has text before its first 'Human:' turn: {lead[:40]!r}")
    if not turns:
        raise _FieldError(field, f"field {field!r} has no 'Human:' turn before the final reply")
    pairs = zip(turns[::2], turns[1::2], strict=True)
    messages = [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in pairs]
    if messages[-1]["role"] != "user":
        raise _FieldError(field, f"field {field!r} has no 'Human:' turn right before the final reply")
    return messages


def _pref_hh(row: Mapping[str, Any]) -> PreferencePair:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    prefix, chosen_reply = _hh_split(chosen, "chosen")
    prefix_rejected, rejected_reply = _hh_split(rejected, "rejected")
    if prefix_rejected != prefix:
        raise _FieldError(
            "rejected", "the conversation before the final reply differs between 'chosen' and 'rejected'"
        )
    return PreferencePair(_hh_messages(prefix, "chosen"), chosen_reply, rejected_reply)


def _pref_chat(row: Mapping[str, Any]) -> PreferencePair:
    chosen = _messages(_get(row, "chosen"), "chosen")
    rejected = _messages(_get(row, "rejected"), "rejected")
    chosen_reply, rejected_reply = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise _FieldError(
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
            raise _FieldError("messages", "field 'messages' holds only the assistant reply, no prompt")
        _ends_with_user(messages[:-1], "messages")
        return Instruction(messages[:-1], response)
    if "prompt" not in row:
        raise _FieldError("prompt", "missing field 'prompt' (or 'messages')")
    return Instruction(_prompt(row), _text(row, "response"))


_PREFERENCE_PARSERS: dict[str, Callable[[Mapping[str, Any]], PreferencePair]] = {
    "hh-rlhf": _pref_hh,
    "ultrafeedback": _pref_chat,
    "jsonl": _pref_jsonl,
}


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
        raise DataFormatError(f"expected a JSON object, got {_type_name(first)}", source=source, row=1)
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


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _jsonl_rows(source: str, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"invalid JSON: {exc.msg} (column {exc.colno})", source=source, row=number
            ) from None


def _jsonl_file_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        yield from _jsonl_rows(source, handle)


def _json_file_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines in a .json file
            yield from _jsonl_rows(source, text.split("\n"))
            return
        raise DataFormatError(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", source=source
        ) from None
    if isinstance(data, dict):  # a single object is one row
        data = [data]
    if not isinstance(data, list):
        raise DataFormatError(f"expected a list of objects, got {_type_name(data)}", source=source)
    yield from enumerate(data, start=1)


def _parquet_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {source} needs the 'pyarrow' package: pip install pyarrow") from None
    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _load_from_disk(path: Path, source: str, split: str | None) -> tuple[str, Any]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ImportError(
            f"{source} is a folder written by the 'datasets' package (save_to_disk); reading it needs that "
            "package: pip install datasets"
        ) from None
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        names = list(data)
        if split is None:
            if len(names) != 1:
                raise DataFormatError(f"has splits {names}; pass split= to choose one", source=source)
            split = names[0]
        if split not in data:
            raise DataFormatError(f"has no split {split!r}; its splits are {names}", source=source)
        return f"{source}[{split}]", data[split]
    own = getattr(data, "split", None)
    if split is not None and own is not None and str(own) != split:
        raise DataFormatError(f"holds the single split {str(own)!r}, not {split!r}", source=source)
    return source, data


def _open_rows(path: str | Path, split: str | None) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Return (source label, iterator of (1-based row number, row)) for a file or a datasets folder."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
            raise DataFormatError(
                "is a folder but not one written by the datasets package's save_to_disk "
                "(no dataset_dict.json or state.json); pass a .jsonl, .json or .parquet file instead",
                source=source,
            )
        source, dataset = _load_from_disk(path, source, split)
        return source, enumerate(iter(dataset), start=1)
    if split is not None:
        raise DataFormatError(
            f"split={split!r} applies only to datasets save_to_disk folders; for files, pass the file of "
            "that split (the demo data ships as <name>_train.jsonl and <name>_test.jsonl)",
            source=source,
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return source, _jsonl_file_rows(path, source)
    if suffix == ".json":
        return source, _json_file_rows(path, source)
    if suffix == ".parquet":
        return source, _parquet_rows(path, source)
    raise DataFormatError(
        f"unsupported file type {suffix or '(none)'!r}; expected one of {list(_SUFFIXES)} or a datasets "
        "save_to_disk folder",
        source=source,
    )


def _check_format(format: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {list(FORMATS)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")


def _load(
    path: str | Path,
    format: str,
    split: str | None,
    limit: int | None,
    skip_invalid: bool,
    kind: Literal["preferences", "instructions"],
) -> list[Any]:
    _check_format(format)
    _check_limit(limit)
    source, numbered = _open_rows(path, split)
    first = next(numbered, None)
    if first is None:
        raise DataFormatError("no rows (the file or split is empty)", source=source)
    rows = chain([first], numbered)
    if format == "auto":
        number, row = first
        try:
            format = detect_format([row], source=source)
        except DataFormatError as exc:
            raise DataFormatError(exc.reason, source=source, row=number) from None
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
    items: list[Any] = []
    skipped = 0
    if limit == 0:
        return items
    for number, row in rows:
        try:
            if not isinstance(row, Mapping):
                raise _FieldError(None, f"expected a JSON object, got {_type_name(row)}")
            items.append(parse(row))
        except _FieldError as exc:
            if not skip_invalid:
                raise DataFormatError(exc.message, source=source, row=number, field=exc.field) from None
            skipped += 1
            log.debug("%s row %d skipped: %s", source, number, exc.message)
        if limit is not None and len(items) >= limit:
            break  # stop before reading further rows
    if skipped:
        log.warning("%s: skipped %d invalid row(s)", source, skipped)
    if not items:
        raise DataFormatError("no valid rows", source=source)
    return items


def load_preferences(
    path: str | Path,
    format: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_invalid: bool = False,
) -> list[PreferencePair]:
    """Load preference pairs from a file or a ``datasets`` ``save_to_disk`` folder.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``save_to_disk`` folder.
        format: ``"auto"`` (see :func:`detect_format`), ``"hh-rlhf"``, ``"ultrafeedback"`` or ``"jsonl"``.
        split: the split of a ``DatasetDict`` folder (optional when it has only one); not for files.
        limit: stop after this many pairs.
        skip_invalid: skip (and count in a warning) rows that do not parse instead of raising.

    Raises:
        DataFormatError: empty source, malformed JSON, or a row with a missing or invalid field
            (the message names the source, the 1-based row and the field).
        FileNotFoundError: ``path`` does not exist.
        ImportError: the source needs ``datasets`` or ``pyarrow`` and it is not installed.
    """
    return _load(path, format, split, limit, skip_invalid, "preferences")


def load_instructions(
    path: str | Path,
    format: str = "auto",
    limit: int | None = None,
    *,
    split: str | None = None,
    skip_invalid: bool = False,
) -> list[Instruction]:
    """Load instructions (prompt messages and target reply) from a file or a ``save_to_disk`` folder.

    Rows are plain JSONL instructions: ``prompt`` (a string or a message list) with ``response``, or
    ``messages`` whose last message is the assistant reply. Preference data is refused with a hint to
    use :func:`load_preferences` (and :func:`pairs_to_instructions`). Other arguments and errors as in
    :func:`load_preferences`.
    """
    return _load(path, format, split, limit, skip_invalid, "instructions")


# --------------------------------------------------------------------------------------------------
# Splits and demo data
# --------------------------------------------------------------------------------------------------


def split_holdout(
    items: Sequence[T], fraction: float = 0.1, seed: int = 0, *, key: Callable[[T], Hashable] | None = None
) -> tuple[list[T], list[T]]:
    """Deterministically split ``items`` into (train, heldout); both keep the input order.

    About ``fraction`` of the items are held out (at least one when ``fraction > 0`` and there are two
    or more groups). With ``key`` (e.g. :func:`prompt_key`), items sharing a key stay on the same side,
    so no prompt appears in both parts. The result depends only on the items, ``fraction`` and ``seed``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item) if key is not None else index, []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = round(len(items) * fraction)
    if fraction > 0 and len(order) >= 2:
        target = max(target, 1)
    held: set[int] = set()
    for indices in order[:-1]:  # always leave at least one group for training
        if len(held) >= target:
            break
        held.update(indices)
    train = [item for i, item in enumerate(items) if i not in held]
    heldout = [item for i, item in enumerate(items) if i in held]
    return train, heldout


def demo_path(name: str, split: str | None = None) -> Path:
    """Path of a shipped demo data file.

    ``name`` is a file name with or without ``.jsonl`` (``"tone_pref_train"``), or a set name from
    :data:`DEMO_SETS` together with ``split`` (``demo_path("tone_pref", "test")``).
    """
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    if split is not None:
        stem = f"{stem}_{split}"
    path = DEMO_DIR / f"{stem}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in DEMO_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no demo data file {stem!r} in {DEMO_DIR}; available: {available}")
    return path
