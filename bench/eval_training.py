"""Measure what the trained artifacts do, against the unsteered model, on held-out data.

The artifacts are applied exactly as the server applies them: loaded with ``load_artifact``, compiled
with ``compile_profile`` and run through the per-row ``install_steering`` hooks.

* Tone preference set (``training/data/tone_pref_test.jsonl``; RAHF ``add`` and ``lora`` artifacts):
  - ``vader``: mean VADER compound score (-1 .. 1) of the greedy replies to the held-out prompts;
  - ``pos%``: share of replies with compound >= 0.05 (VADER's "positive" threshold);
  - ``pref_acc``: preference accuracy - share of held-out pairs whose chosen reply gets a higher
    summed log-probability than the rejected one (``margin``: mean of that log-probability margin);
  - ``fluency_nll``: mean per-token NLL of the greedy replies under the *unsteered* model - a guard
    against steering that buys sentiment with broken text (the unsteered model's own replies score
    lowest; gibberish scores high).
* Sign-off instruction set (``training/data/signoff_inst_test.jsonl``; RED artifacts):
  - ``signoff%``: share of greedy replies whose last line is the sign-off ``— Steery``;
  - ``nll``: mean response-token NLL of the held-out reference replies; ``fluency_nll`` as above, on
    the replies without their sign-off line.

Usage::

    python bench/eval_training.py                       # artifacts found under runs/
    python bench/eval_training.py --tone runs/rahf-scit/add.safetensors --strengths 0.5 1 2 --limit 40

Writes the table as JSON to ``bench/out/eval_training.json`` (``--out``). Needs ``vaderSentiment``.
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
from steering_vectors import compile_profile, install_steering, load_artifact  # noqa: E402
from steering_vectors.profile import VectorRef  # noqa: E402
from training.demo import SIGNOFF, demo_path  # noqa: E402
from training.loaders import load_instructions, load_preferences  # noqa: E402
from training.tokens import IGNORE_INDEX, collate, encode  # noqa: E402


class Steered:
    """The model with one artifact (or none) applied at a strength through the serving hooks."""

    def __init__(self, lm, hooks, artifact=None, strength: float = 1.0):
        self.lm, self.hooks, self.slot = lm, hooks, 0
        if artifact is not None and strength != 0:
            cfg = lm.model.config
            prof = compile_profile(
                [(VectorRef("v", strength), artifact)],
                num_layers=cfg.num_hidden_layers,
                hidden_size=cfg.hidden_size,
            )
            self.slot = hooks.acquire(prof)

    def close(self) -> None:
        self.hooks.release(self.slot)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
        tok, model = self.lm.tokenizer, self.lm.model
        tok.padding_side = "left"
        outs: list[str] = []
        for i in range(0, len(prompts), batch_size):
            texts = [
                tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                for p in prompts[i : i + batch_size]
            ]
            b = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with self.hooks.batch([self.slot] * len(texts)):
                gen = model.generate(
                    **b,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            outs += tok.batch_decode(gen[:, b["input_ids"].shape[1] :], skip_special_tokens=True)
        return outs

    @torch.no_grad()
    def response_logprobs(
        self, examples: list[tuple[list[dict], str]], batch_size: int, drop_last: bool = False
    ) -> list[tuple[float, int]]:
        """(summed log-probability, token count) of each response (its tokens and end-of-turn) given
        its prompt; ``drop_last`` leaves out the end-of-turn token."""
        tok, model = self.lm.tokenizer, self.lm.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        enc = [encode(tok, p, r) for p, r in examples]
        out: list[tuple[float, int]] = []
        for i in range(0, len(enc), batch_size):
            b = collate(enc[i : i + batch_size], pad)
            with self.hooks.batch([self.slot] * b["input_ids"].shape[0]):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lp = F.log_softmax(logits[:, :-1].float(), -1)
            tgt = b["labels"][:, 1:]
            mask = tgt != IGNORE_INDEX
            if drop_last:
                last = mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True)
                mask = mask & ~last
            tok_lp = lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * mask
            out += list(zip(tok_lp.sum(-1).tolist(), mask.sum(-1).tolist(), strict=True))
        return out


def fluency_nll(base: Steered, prompts: list[list[dict]], gens: list[str], batch_size: int) -> float:
    """Mean per-token NLL of the generated replies under the unsteered model (lower = more fluent)."""
    res = base.response_logprobs(list(zip(prompts, gens, strict=True)), batch_size, drop_last=True)
    return -sum(s for s, _ in res) / max(1, sum(n for _, n in res))


def eval_tone(st: Steered, base: Steered, pairs, args, vader) -> dict:
    prompts = [p.prompt for p in pairs]
    gens = st.generate(prompts, args.max_new_tokens, args.batch_size)
    scores = [vader.polarity_scores(g)["compound"] for g in gens]
    lp_c = st.response_logprobs([(p.prompt, p.chosen) for p in pairs], args.batch_size)
    lp_r = st.response_logprobs([(p.prompt, p.rejected) for p in pairs], args.batch_size)
    margins = [c[0] - r[0] for c, r in zip(lp_c, lp_r, strict=True)]
    return {
        "vader": sum(scores) / len(scores),
        "pos%": 100 * sum(s >= 0.05 for s in scores) / len(scores),
        "pref_acc": 100 * sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "fluency_nll": fluency_nll(base, prompts, gens, args.batch_size),
        "len": sum(len(g.split()) for g in gens) / len(gens),
        "samples": gens[: args.samples],
    }


def eval_signoff(st: Steered, base: Steered, items, args) -> dict:
    prompts = [it.prompt for it in items]
    gens = st.generate(prompts, args.max_new_tokens_inst, args.batch_size)
    ends = [g.strip().splitlines()[-1].strip() == SIGNOFF if g.strip() else False for g in gens]
    lps = st.response_logprobs([(it.prompt, it.response) for it in items], args.batch_size)
    return {
        "signoff%": 100 * sum(ends) / len(ends),
        "nll": -sum(s for s, _ in lps) / sum(n for _, n in lps),
        "fluency_nll": fluency_nll(base, prompts, [_strip_signoff(g) for g in gens], args.batch_size),
        "len": sum(len(g.split()) for g in gens) / len(gens),
        "samples": gens[: args.samples],
    }


def _strip_signoff(text: str) -> str:
    """The reply without a trailing sign-off line (which the unsteered model never writes)."""
    lines = text.rstrip().splitlines()
    if lines and lines[-1].strip() == SIGNOFF:
        lines = lines[:-1]
    return "\n".join(lines).rstrip() or text


def _discover(runs: Path) -> tuple[list[Path], list[Path]]:
    tone = sorted(
        p
        for d in sorted(runs.glob("rahf-*"))
        for p in (d / "add.safetensors", d / "lora.safetensors")
        if p.exists()
    )
    inst = sorted(runs.glob("red/*.safetensors"))
    return tone, inst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"))
    ap.add_argument("--tone", nargs="*", default=None, help="artifacts to evaluate on the tone set")
    ap.add_argument("--inst", nargs="*", default=None, help="artifacts to evaluate on the sign-off set")
    ap.add_argument("--strengths", nargs="+", type=float, default=[1.0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=None, help="held-out examples per set (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tone replies")
    ap.add_argument("--max-new-tokens-inst", type=int, default=64, help="sign-off replies")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2, help="replies kept per row in the JSON")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "eval_training.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tone_arts, inst_arts = _discover(Path(args.runs_dir))
    tone_arts = [Path(p) for p in args.tone] if args.tone is not None else tone_arts
    inst_arts = [Path(p) for p in args.inst] if args.inst is not None else inst_arts

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    t0 = time.monotonic()
    lm = load_model(args.model, quantization="none", dtype="float32", device="cpu")
    hooks = install_steering(lm.model)
    base = Steered(lm, hooks)
    rows = []

    def run(set_name: str, path: Path | None, strength: float, fn) -> None:
        art = load_artifact(path) if path is not None else None
        st = Steered(lm, hooks, art, strength)
        t = time.monotonic()
        try:
            res = fn(st)
        finally:
            st.close()
        row = {
            "set": set_name,
            "artifact": str(path.relative_to(ROOT) if path and path.is_relative_to(ROOT) else path)
            if path
            else "unsteered",
            "kind": art.kind if art else "-",
            "method": art.method if art else "-",
            "strength": strength if art else 0.0,
            **res,
            "eval_s": round(time.monotonic() - t, 1),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)

    if tone_arts:
        pairs = load_preferences(demo_path("tone_pref", "test"), limit=args.limit)
        run("tone", None, 0.0, lambda st: eval_tone(st, base, pairs, args, vader))
        for p in tone_arts:
            for w in args.strengths:
                run("tone", p, w, lambda st: eval_tone(st, base, pairs, args, vader))
    if inst_arts:
        items = load_instructions(demo_path("signoff_inst", "test"), limit=args.limit)
        run("signoff", None, 0.0, lambda st: eval_signoff(st, base, items, args))
        for p in inst_arts:
            for w in args.strengths:
                run("signoff", p, w, lambda st: eval_signoff(st, base, items, args))

    print()
    print(f"{'set':8} {'artifact':40} {'method':10} {'w':>4}  metrics")
    for r in rows:
        if r["set"] == "tone":
            m = (
                f"vader {r['vader']:+.3f}  pos% {r['pos%']:5.1f}  pref_acc {r['pref_acc']:5.1f}%  "
                f"margin {r['margin']:+7.2f}  fluency_nll {r['fluency_nll']:.2f}  words {r['len']:.1f}"
            )
        else:
            m = (
                f"signoff% {r['signoff%']:5.1f}  nll {r['nll']:.3f}  fluency_nll {r['fluency_nll']:.2f}  "
                f"words {r['len']:.1f}"
            )
        print(f"{r['set']:8} {r['artifact'][-40:]:40} {r['method']:10} {r['strength']:4g}  {m}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "wall_s": round(time.monotonic() - t0, 1),
                "max_new_tokens": args.max_new_tokens,
                "limit": args.limit,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
