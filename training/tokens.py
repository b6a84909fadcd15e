"""Tokenisation and batching of (prompt, response) examples for the trainers.

An example is the chat-templated prompt followed by the response; the loss and the hidden states of
every method are read on the response tokens only. :func:`encode` tokenises the two parts separately,
so the response tokens are the same whatever precedes them (RAHF-SCIT compares one response under two
instructions); :func:`collate` right-pads a batch and labels the response tokens
(``labels = IGNORE_INDEX`` elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["IGNORE_INDEX", "Encoded", "batches", "collate", "encode", "encode_all", "pad_token_id"]

IGNORE_INDEX = -100
"""Label of the positions that carry no loss (prompt and padding), as in ``torch``'s cross-entropy."""


@dataclass
class Encoded:
    """One tokenised example: ``input_ids[:n_prompt]`` is the prompt, the rest the response."""

    input_ids: list[int]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.n_prompt :]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, else its end-of-sequence id, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _with_system(messages: Sequence[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    msgs = [dict(m) for m in messages]
    if system is None:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{system}\n\n{msgs[0]['content']}"
        return msgs
    return [{"role": "system", "content": system}, *msgs]


def _texts(tokenizer, messages: list[dict[str, str]], response: str) -> tuple[str, str]:
    """(prompt text ending with the assistant header, response text ending with the end-of-turn)."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        pre = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(pre) and response in full[len(pre) :]:
            return pre, full[len(pre) :].rstrip()
        return pre, response + eos
    pre = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return pre, response + eos


def encode(
    tokenizer,
    prompt: Sequence[dict[str, str]],
    response: str,
    *,
    system: str | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Tokenise ``prompt`` (chat messages) + ``response`` through the chat template.

    ``system`` (e.g. RAHF-SCIT's good/bad instruction) becomes the system message (prepended to an
    existing one). The prompt is the template up to and including the assistant header; the response
    is the reply and the end-of-turn token (trailing whitespace after it is dropped). The two parts are
    tokenised separately, so the response tokens are identical whatever precedes them. Over
    ``max_length`` the response is cut to at most half of it, the prompt loses its oldest tokens.
    """
    pre, resp = _texts(tokenizer, _with_system(prompt, system), response)
    p_ids = tokenizer(pre, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        r_ids = r_ids[: max(max_length - len(p_ids), max_length // 2)]
        p_ids = p_ids[len(p_ids) - (max_length - len(r_ids)) :]
    if not r_ids:
        raise ValueError("empty response after tokenisation")
    return Encoded(list(p_ids) + list(r_ids), len(p_ids))


def encode_all(tokenizer, items: Iterable, max_length: int) -> list[Encoded]:
    """:func:`encode` each item's ``prompt`` and ``response`` (e.g. :class:`training.records.Instruction`)."""
    return [encode(tokenizer, it.prompt, it.response, max_length=max_length) for it in items]


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (response tokens only),
    ``n_prompt`` and ``n_response`` [B]."""
    T = max(len(e.input_ids) for e in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt : n] = torch.tensor(e.response_ids)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "n_prompt": torch.tensor([e.n_prompt for e in items]),
        "n_response": torch.tensor([e.n_response for e in items]),
    }


def batches(items: Sequence[Encoded], pad_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`collate` of consecutive chunks of ``batch_size`` items, in order."""
    for i in range(0, len(items), batch_size):
        yield collate(items[i : i + batch_size], pad_id)
