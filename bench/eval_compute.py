"""What a vector computed from contrastive pairs (``steerserve vectors compute``) does to the default model.

The demo tone set (``training/data/tone_pref_{train,test}.jsonl``, read directly: 336 training and 84
held-out pairs, a polite and a rude reply with the same content) gives the pairs: the positive text is
the chat-formatted prompt followed by the polite reply, the negative one the same with the rude reply
(so the last token, where the states are read, lies in the reply). ``mean-diff`` and ``pca`` vectors are
computed from the training pairs at the default layers, then applied at several strengths through the
serving hooks (``positions: all``) to measure the **held-out preference accuracy**: the share of held-out
pairs whose polite reply (its tokens and the end-of-turn token) gets the higher summed log-probability
given the prompt. Strength 0 is the unsteered model.

Usage::

    python bench/eval_compute.py [--strengths -2 -1 0 1 2 4] [--out bench/out/compute.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from basemodel import load_model  # noqa: E402
from steering_vectors import Artifact, VectorRef, compile_profile, install_steering  # noqa: E402
from steering_vectors.compute import encode_pairs, read_pair_states, read_pairs  # noqa: E402

DATA = ROOT / "training" / "data"
STRENGTHS = (-0.5, -0.25, 0.0, 0.125, 0.25, 0.5, 1.0, 2.0)


def tone_pairs(split: str) -> list[dict[str, str]]:
    """The demo tone pairs of ``split`` (``train`` or ``test``): ``{prompt, chosen, rejected}``."""
    path = DATA / f"tone_pref_{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prefix(tok, prompt: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def contrast_pairs(tok, split: str = "train") -> list[tuple[list[int], list[int]]]:
    """Token ids of (prompt + polite reply, prompt + rude reply) for each pair of ``split``, as
    ``steerserve vectors compute --pairs training/data/tone_pref_train.jsonl`` reads them."""
    return encode_pairs(tok, read_pairs(DATA / f"tone_pref_{split}.jsonl", tok), max_tokens=1024)


@torch.no_grad()
def reply_logprobs(
    model, tok, hooks, slot: int, items: list[tuple[str, str]], batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each reply (its tokens and the end-of-turn token) given its prompt, with
    steering slot ``slot`` on every token."""
    eot = tok.eos_token or "<|im_end|>"
    seqs = []
    for prompt, reply in items:
        pre = tok.encode(_prefix(tok, prompt), add_special_tokens=False)
        seqs.append((pre, tok.encode(reply + eot, add_special_tokens=False)))
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        T = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for i, (p, r) in enumerate(batch):  # right padded
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        with hooks.batch([slot] * len(batch)):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]
        for i, (p, r) in enumerate(batch):
            out.append(float(lp[i, len(p) - 1 : len(p) + len(r) - 1].sum()))
    return out


def preference_accuracy(model, tok, hooks, art: Artifact | None, strength: float, rows) -> float:
    """Share (%) of ``rows`` whose polite reply gets the higher summed log-probability with ``art`` at
    ``strength`` (``art=None`` or strength 0: the unsteered model)."""
    slot = 0
    if art is not None and strength != 0:
        cfg = model.config
        prof = compile_profile(
            [(VectorRef("v", strength), art)], num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size
        )
        slot = hooks.acquire(prof)
    try:
        good = reply_logprobs(model, tok, hooks, slot, [(r["prompt"], r["chosen"]) for r in rows])
        bad = reply_logprobs(model, tok, hooks, slot, [(r["prompt"], r["rejected"]) for r in rows])
    finally:
        hooks.release(slot)
    return 100.0 * sum(g > b for g, b in zip(good, bad, strict=True)) / len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "compute.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lm = load_model(quantization="none", dtype="float32", device="cpu")
    model, tok = lm.model, lm.tokenizer
    test = tone_pairs("test")
    t0 = time.monotonic()
    states = read_pair_states(model, contrast_pairs(tok, "train"))  # one read for both methods
    report: dict = {"train_pairs": len(states.pos[states.layers[0]]), "test_pairs": len(test)}
    report.update(read_s=round(time.monotonic() - t0, 1), layers=states.layers, methods={})
    hooks = install_steering(model)
    try:
        for method in ("mean-diff", "pca"):
            art = states.artifact(method)
            acc = {f"{w:g}": preference_accuracy(model, tok, hooks, art, w, test) for w in args.strengths}
            rel = json.loads(art.extra["relative_norms"])
            report["methods"][method] = {"relative_norms": rel, "accuracy": acc}
            print(method, json.dumps(report["methods"][method]), flush=True)
    finally:
        hooks.remove()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
