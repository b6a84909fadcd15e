"""Alignment quality on held-out prompts: RED and RAHF against the base model and two baselines, 3 seeds.

The small-scale analogue of the RED and RAHF papers' tables, on the tone preference demo set
(``training/data/tone_pref_{train,test}.jsonl``: polite vs rude replies with the same content), plus
human-written chat turns (``bench/chitchat.py``: people's questions and replies from the
``chitchat-dataset`` package) for the metrics that need no preference labels.

Methods (every one trained on the same 336 training pairs, ``runs/align/<method>/seed<N>/``):

==============  ==========================================================================================
base            the unsteered default model
red             ``steerserve train red`` on the chosen replies (SFT), kind ``red``
red-lr<LR>      the same at learning rate LR (``--red-lrs``: the learning-rate sweep, seed 0)
rahf-scit       ``steerserve train rahf --variant scit``: the final model (``lora``: step 1 + step 3) and
                our mean-difference vector (``add``)
rahf-dual       ``steerserve train rahf --variant dual``: the same two artifacts
mean-diff       the ``steering-vectors`` library's mean-difference vector (``bench/align_baselines.py``)
dpo             TRL's DPO with a peft LoRA r8 on q/v (``bench/align_baselines.py``)
==============  ==========================================================================================

Every artifact is applied at strength 1 through the serving hooks (``eval_training.Steered``). Metrics:

* ``pref_acc``: share of the 84 held-out pairs whose chosen reply gets the higher summed log-probability;
* ``vader``: mean VADER compound score (an external lexicon scorer, −1 … 1) of the greedy replies to the
  84 held-out prompts;
* ``ppl``: fluency — perplexity, under the *base* model, of the greedy replies to neutral prompts (the
  first ``--neutral`` questions of ``signoff_inst_test.jsonl``; the sign-off line is not in the prompts);
* ``distinct2``: distinct bigrams / all bigrams over those neutral replies (pooled; low = repetitive);
* ``chat_vader``: mean VADER compound of the greedy replies to ``--chat`` human-written questions;
* ``chat_nll``: per-token NLL, under the steered model, of the people's own replies to those questions
  (how well it still models human replies; the base model's value is the reference).

Usage::

    python bench/eval_alignment.py                 # train what is missing, evaluate, report
    python bench/eval_alignment.py train --seeds 0 1 2 --methods red dpo
    python bench/eval_alignment.py train --seeds 0 --red-lrs 5e-3 2e-2 5e-2   # the RED sweep
    python bench/eval_alignment.py eval            # evaluate every artifact under runs/align/
    python bench/eval_alignment.py report          # tables (markdown) and bench/out/alignment.png

Evaluations are cached per artifact sha256 in ``bench/out/align/``; training skips runs whose artifacts
exist. ``--methods`` also limits what ``eval`` evaluates (two eval processes can split the work).
Measured on the shared 2-core CPU machine, one thread per run: see the README's Alignment quality
section for the costs of the current recipes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from eval_training import Steered  # bench/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import chitchat  # noqa: E402  (bench/)

from basemodel import load_model  # noqa: E402
from steering_vectors import install_steering, load_artifact  # noqa: E402
from training.config import RedConfig  # noqa: E402
from training.demo import demo_path  # noqa: E402
from training.loaders import load_instructions, load_preferences  # noqa: E402

RUNS = ROOT / "runs" / "align"
CACHE = ROOT / "bench" / "out" / "align"
TRAIN = "training/data/tone_pref_train.jsonl"
TEST = "training/data/tone_pref_test.jsonl"
CHAT = ROOT / "bench" / "out" / "chitchat_eval.jsonl"
EXE = str(Path(sys.executable).parent / "steerserve")
PY = sys.executable


def _rahf(variant: str, seed: int, out_dir) -> list[str]:
    return [
        EXE,
        "train",
        "rahf",
        "--variant",
        variant,
        "--data",
        TRAIN,
        "--eval-data",
        TEST,
        "--seed",
        str(seed),
        "--out-dir",
        str(out_dir),
    ]


def _red(seed: int, out_dir, lr: float | None = None) -> list[str]:
    cmd = [EXE, "train", "red", "--data", TRAIN, "--eval-data", TEST, "--seed", str(seed)]
    return [*cmd, *(["--lr", f"{lr:g}"] if lr is not None else []), "--out", f"{out_dir}/red.safetensors"]


# method -> (artifact files it writes, command for seed s into directory d)
METHODS: dict[str, tuple[tuple[str, ...], object]] = {
    "red": (("red.safetensors",), _red),
    "rahf-scit": (("add.safetensors", "lora.safetensors"), lambda s, d: _rahf("scit", s, d)),
    "rahf-dual": (("add.safetensors", "lora.safetensors"), lambda s, d: _rahf("dual", s, d)),
    "mean-diff": (
        ("add.safetensors",),
        lambda s, d: [
            PY,
            "bench/align_baselines.py",
            "mean-diff",
            "--seed",
            str(s),
            "--out",
            f"{d}/add.safetensors",
        ],
    ),
    "dpo": (
        ("lora.safetensors",),
        lambda s, d: [
            PY,
            "bench/align_baselines.py",
            "dpo",
            "--seed",
            str(s),
            "--out",
            f"{d}/lora.safetensors",
        ],
    ),
}
# table rows: (label, method, artifact file)
ROWS = [
    ("base model", None, None),
    ("RED", "red", "red.safetensors"),
    ("RAHF-SCIT final model (LoRA)", "rahf-scit", "lora.safetensors"),
    ("RAHF-SCIT step-2 vector (ours)", "rahf-scit", "add.safetensors"),
    ("RAHF-Dual final model (LoRA)", "rahf-dual", "lora.safetensors"),
    ("RAHF-Dual step-2 vector (ours)", "rahf-dual", "add.safetensors"),
    ("mean-diff (steering-vectors)", "mean-diff", "add.safetensors"),
    ("DPO LoRA (TRL)", "dpo", "lora.safetensors"),
]
METRICS = ("pref_acc", "vader", "ppl", "distinct2", "chat_vader", "chat_nll")
DIGITS = {"pref_acc": 1, "vader": 3, "ppl": 2, "distinct2": 3, "chat_vader": 3, "chat_nll": 3}


def _sweep_method(lr: float) -> str:
    return f"red-lr{lr:g}"


def _add_sweep(lrs: list[float]) -> None:
    """Register the RED learning-rate sweep's methods and rows (``red-lr<LR>``)."""
    for lr in lrs:
        name = _sweep_method(lr)
        METHODS[name] = (("red.safetensors",), lambda s, d, lr=lr: _red(s, d, lr))
        ROWS.append((f"RED lr {lr:g}", name, "red.safetensors"))


def cmd_train(args: argparse.Namespace) -> None:
    """Run the missing training runs, ``--jobs`` at a time (one OpenMP thread each by default)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    todo = []
    for method in args.methods:
        files, command = METHODS[method]
        for s in args.seeds:
            d = RUNS / method / f"seed{s}"
            if all((d / f).exists() for f in files):
                print(f"[train] {method} seed {s}: present in {d.relative_to(ROOT)}", flush=True)
            else:
                todo.append((method, s, command(s, d.relative_to(ROOT)), d))

    def run(item) -> None:
        method, s, cmd, d = item
        d.mkdir(parents=True, exist_ok=True)
        print(f"[train] {' '.join(map(str, cmd))}  (log: {d.relative_to(ROOT)}/train.log)", flush=True)
        t0 = time.monotonic()
        with open(d / "train.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"[train] {method} seed {s}: {time.monotonic() - t0:.0f} s", flush=True)

    with cf.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for f in [pool.submit(run, item) for item in todo]:
            f.result()


def distinct2(texts: list[str]) -> float:
    """Distinct bigrams over all bigrams of the whitespace tokens of ``texts`` (pooled)."""
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / max(1, len(grams))


def evaluate(st: Steered, base: Steered, pairs, neutral, chat, args, vader) -> dict:
    """The metrics of one steered model (see the module docstring)."""
    lp_c = st.response_logprobs([(p.prompt, p.chosen) for p in pairs], args.batch_size)
    lp_r = st.response_logprobs([(p.prompt, p.rejected) for p in pairs], args.batch_size)
    tone = st.generate([p.prompt for p in pairs], args.max_new_tokens, args.batch_size)
    neutral_prompts = [it.prompt for it in neutral]
    gens = st.generate(neutral_prompts, args.max_new_tokens, args.batch_size)
    scored = base.response_logprobs(list(zip(neutral_prompts, gens, strict=True)), args.batch_size, True)
    nll = -sum(s for s, _ in scored) / max(1, sum(n for _, n in scored))
    chat_gens = st.generate([it.prompt for it in chat], args.max_new_tokens, args.batch_size)
    human = st.response_logprobs([(it.prompt, it.response) for it in chat], args.batch_size, True)
    return {
        "chat_vader": statistics.fmean(vader.polarity_scores(g)["compound"] for g in chat_gens),
        "chat_nll": -sum(s for s, _ in human) / max(1, sum(n for _, n in human)),
        "pref_acc": 100 * sum(c[0] > r[0] for c, r in zip(lp_c, lp_r, strict=True)) / len(pairs),
        "vader": statistics.fmean(vader.polarity_scores(g)["compound"] for g in tone),
        "ppl": math.exp(nll),
        "distinct2": distinct2(gens),
        "samples": {"tone": tone[:3], "neutral": gens[:3], "chat": chat_gens[:3]},
    }


def _artifacts(methods: list[str], kinds: list[str]) -> list[tuple[str, str, int, Path]]:
    out = []
    for label, method, fname in ROWS[1:]:
        if method not in methods or fname.split(".")[0] not in kinds:
            continue
        for d in sorted((RUNS / method).glob("seed*")):
            if (d / fname).exists():
                out.append((label, method, int(d.name[4:]), d / fname))
    return out


def cmd_eval(args: argparse.Namespace) -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    CACHE.mkdir(parents=True, exist_ok=True)
    settings = {"max_new_tokens": args.max_new_tokens, "neutral": args.neutral, "chat": args.chat}
    lm = load_model(None, quantization="none", dtype="float32", device="cpu")
    hooks = install_steering(lm.model)
    base = Steered(lm, hooks)
    pairs = load_preferences(demo_path("tone_pref", "test"))
    neutral = load_instructions(demo_path("signoff_inst", "test"))[: args.neutral]
    chat_file = CHAT if CHAT.exists() else chitchat.write_jsonl(CHAT, args.chat, seed=0)
    chat = load_instructions(chat_file, format="jsonl", limit=args.chat)
    todo = [("base model", None, 0, None), *_artifacts(args.methods, args.kinds)]
    for label, method, seed, path in todo:
        art = load_artifact(path) if path is not None else None
        key = art.sha256[:16] if art is not None else "base"
        cache = CACHE / f"{key}.json"
        if cache.exists() and json.loads(cache.read_text()).get("settings") == settings:
            continue
        t0 = time.monotonic()
        st = Steered(lm, hooks, art, 1.0)
        try:
            res = evaluate(st, base, pairs, neutral, chat, args, vader)
        finally:
            st.close()
        row = {
            "label": label,
            "method": method,
            "seed": seed,
            "artifact": str(path.relative_to(ROOT)) if path else None,
            "settings": settings,
            **res,
            "eval_s": round(time.monotonic() - t0, 1),
        }
        cache.write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)


def _fmt(metric: str, vals: list[float]) -> str:
    digits = DIGITS[metric]
    if not vals:
        return "—"
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


HEADER = (
    "| method | seeds | preference accuracy % | VADER compound | fluency ppl (base model) | distinct-2 "
    "| chat VADER | chat human-reply NLL |\n|---|---|---|---|---|---|---|---|"
)


def _row(label: str, rs: list[dict]) -> tuple[str, dict]:
    """One markdown table row (mean ± sd over the seeds) and its JSON record."""
    vals = {m: [r[m] for r in rs if m in r] for m in METRICS}
    seeds = "—" if rs[0]["method"] is None else ",".join(str(r["seed"]) for r in rs)
    line = f"| {label} | {seeds} | " + " | ".join(_fmt(m, vals[m]) for m in METRICS) + " |"
    record = {
        "label": label,
        "seeds": [r["seed"] for r in rs],
        **{
            m: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for m, v in vals.items()
            if v
        },
    }
    return line, record


def cmd_report(args: argparse.Namespace) -> None:
    settings = {"max_new_tokens": args.max_new_tokens, "neutral": args.neutral, "chat": args.chat}
    rows = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("settings") == settings:
            by_label.setdefault(r["label"], []).append(r)
    tables: dict[str, list] = {"main": [], "sweep": []}
    lines = {"main": [HEADER], "sweep": [HEADER]}
    for label, method, _f in ROWS:
        rs = sorted(by_label.get(label, []), key=lambda r: r["seed"])
        if not rs:
            continue
        part = "sweep" if method and method.startswith("red-lr") else "main"
        line, record = _row(label, rs)
        lines[part].append(line)
        tables[part].append(record)
    default = [r for r in by_label.get("RED", []) if r["seed"] == 0]
    if default and tables["sweep"]:  # the sweep's point at the default learning rate is RED's seed 0
        lr = RedConfig.__dataclass_fields__["lr"].default
        line, record = _row(f"RED lr {lr:g} (default)", default)
        lines["sweep"].append(line)
        tables["sweep"].append(record)
    md = "\n".join(lines["main"]) + "\n\nRED learning-rate sweep (seed 0):\n\n" + "\n".join(lines["sweep"])
    print(md)
    out = ROOT / "bench" / "out"
    (out / "alignment.json").write_text(
        json.dumps({"rows": tables["main"], "red_sweep": tables["sweep"]}, indent=2) + "\n"
    )
    (out / "alignment.md").write_text(md + "\n")
    _plot(tables["main"], out / "alignment.png")
    print(f"wrote {out / 'alignment.md'}, {out / 'alignment.json'}, {out / 'alignment.png'}")


def _plot(table: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [t["label"].replace(" (", "\n(") for t in table]
    titles = {
        "pref_acc": "preference accuracy (%)",
        "vader": "VADER compound (tone replies)",
        "ppl": "perplexity under base model (neutral replies)",
        "distinct2": "distinct-2 (neutral replies)",
        "chat_vader": "VADER compound (replies to human chat)",
        "chat_nll": "NLL of the human replies (chat)",
    }
    colour = {"base": "#888", "RED": "#37c", "RAHF": "#3a7"}
    colours = [next((c for k, c in colour.items() if t["label"].startswith(k)), "#c73") for t in table]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    for ax, m in zip(axes.flat, METRICS, strict=True):
        ax.bar(
            range(len(table)),
            [t[m]["mean"] if m in t else 0.0 for t in table],
            yerr=[t[m]["sd"] if m in t else 0.0 for t in table],
            capsize=3,
            color=colours,
        )
        ax.set_xticks(range(len(table)), labels, rotation=40, ha="right", fontsize=7)
        ax.set_title(titles[m], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Alignment on held-out prompts, SmolLM2-135M-Instruct (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=("all", "train", "eval", "report"), default="all")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=("red", "lora", "add"),
        default=["red", "lora", "add"],
        help="artifact files to evaluate (e.g. the final models first, the vectors later)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--neutral", type=int, default=36, help="neutral prompts for the fluency metrics")
    ap.add_argument("--chat", type=int, default=24, help="human-written chat questions (bench/chitchat.py)")
    ap.add_argument("--red-lrs", nargs="*", type=float, default=[], help="RED learning-rate sweep")
    ap.add_argument("--batch-size", type=int, default=28)
    ap.add_argument("--jobs", type=int, default=2, help="training runs side by side")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    _add_sweep(args.red_lrs)
    args.methods = [*args.methods, *(_sweep_method(lr) for lr in args.red_lrs)]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command in ("all", "train"):
        cmd_train(args)
    if args.command in ("all", "eval"):
        cmd_eval(args)
    if args.command in ("all", "report"):
        cmd_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
