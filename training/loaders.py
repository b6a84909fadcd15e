"""Loading training data from files and ``datasets`` folders, and holding out an evaluation split.

Sources: a ``.jsonl`` file (one JSON object per line; blank lines are skipped), a ``.json`` file (a list
of objects, or JSON Lines), a ``.parquet`` file (needs ``pyarrow``), or a folder written by the
``datasets`` package's ``save_to_disk`` (needs ``datasets``; read with ``load_from_disk``, so nothing is
ever downloaded). A ``DatasetDict`` folder takes ``split=``. Rows are parsed by :mod:`training.formats`
into the records of :mod:`training.records`; problems raise :class:`~training.formats.DataFormatError`
naming the source, the 1-based row and the field.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .formats import FORMATS, DataFormatError, FieldError, detect_format, row_parser, type_name
from .records import Instruction, PreferencePair, prompt_key

if TYPE_CHECKING:
    from .config import TrainOptions

__all__ = ["load_instructions", "load_preferences", "load_splits", "split_holdout"]

log = logging.getLogger(__name__)

_SUFFIXES = (".jsonl", ".json", ".parquet")

T = TypeVar("T")


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
        raise DataFormatError(f"expected a list of objects, got {type_name(data)}", source=source)
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
    parse = row_parser(kind, format, source=source)
    items: list[Any] = []
    skipped = 0
    if limit == 0:
        return items
    for number, row in rows:
        try:
            items.append(parse(row))
        except FieldError as exc:
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
# Splits
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


def load_splits(opts: TrainOptions, load: Callable[..., list[T]]) -> tuple[list[T], list[T]]:
    """The training items and the held-out ones of a run: ``load(path, format=, limit=)`` of
    ``opts.data`` (at most ``opts.limit``) and of ``opts.eval_data`` (at most ``opts.eval_limit``), or,
    without eval data, :func:`split_holdout` of the training items (``opts.eval_fraction``, seeded by
    ``opts.seed``, disjoint by prompt) cut to ``opts.eval_limit``."""
    items = load(opts.data, format=opts.format, limit=opts.limit)
    if opts.eval_data:
        return items, load(opts.eval_data, format=opts.format, limit=opts.eval_limit)
    items, held = split_holdout(items, opts.eval_fraction, opts.seed, key=prompt_key)
    return items, held[: opts.eval_limit] if opts.eval_limit else held
