"""Print the README's benchmark tables (markdown) from the JSON results under ``bench/out/``.

Usage:  python bench/report.py [--out-dir bench/out]

Reads ``hooks.json``, ``serving.json`` and ``sweep.json`` (``make bench``), ``training.json`` and
``alignment.md`` (``make eval``), ``compute.json`` (``bench/eval_compute.py``); a missing file is skipped
with a note. The README's tables are this script's output for the run they report, so every figure in
them can be traced to one JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def hooks_table(h: dict) -> str:
    ms = h["median_step_ms"]
    return "\n".join(
        [
            f"| decode step, batch {h['batch']} ({h['rounds']} rounds × {h['steps']} steps) | ms "
            "| vs no hooks |",
            "|---|---|---|",
            *(
                f"| {name} | {ms[key]:.2f} | {ms[key] / ms['none']:.3f} |"
                for key, name in (
                    ("none", "no hooks"),
                    ("idle", "hooks installed, no row steered"),
                    ("steered", "RED + 2 add on all layers"),
                    ("mix", "RED + add + LoRA on all layers"),
                )
                if key in ms
            ),
        ]
    )


def serving_tables(s: dict) -> str:
    out = []
    if "overhead" in s:
        o = s["overhead"]
        names = list(o["batch 1"]["ratio"])
        out += [
            "| engine tokens/s, profile on all 30 layers | batch 1 | ratio | batch 8 | ratio |",
            "|---|---|---|---|---|",
            f"| unsteered | {o['batch 1']['tokens_per_s']['unsteered']:.1f} | 1 "
            f"| {o['batch 8']['tokens_per_s']['unsteered']:.1f} | 1 |",
        ]
        for n in names:
            out.append(
                f"| {n} | {o['batch 1']['tokens_per_s'][n]:.1f} | **{o['batch 1']['ratio'][n]:.3f}** "
                f"| {o['batch 8']['tokens_per_s'][n]:.1f} | **{o['batch 8']['ratio'][n]:.3f}** |"
            )
        out.append("")
    if "distinct" in s:
        d = s["distinct"]
        ns = list(d)
        out += [
            "| rows N (RED + add + LoRA profiles) | " + " | ".join(ns) + " |",
            "|---|" + "---|" * len(ns),
            "| N rows, one shared profile, tokens/s | "
            + " | ".join(f"{d[n]['tokens_per_s']['shared']:.1f}" for n in ns)
            + " |",
            "| N rows, N distinct profiles, tokens/s | "
            + " | ".join(f"{d[n]['tokens_per_s']['distinct']:.1f}" for n in ns)
            + " |",
            "| distinct / shared | " + " | ".join(f"**{d[n]['ratio']:.3f}**" for n in ns) + " |",
            "",
        ]
    if "batching" in s:
        b = s["batching"]
        c, st = b["continuous"], b["static"]
        out += [
            "| staggered arrivals, mixed lengths | continuous (steerserve) | static | continuous / static |",
            "|---|---|---|---|",
            f"| tokens/s | {c['tokens_per_s']:.1f} | {st['tokens_per_s']:.1f} "
            f"| {b['throughput_ratio']:.2f}× |",
            f"| p50 latency, short requests (8 tokens) | {c['p50_short_s']:.2f} s "
            f"| {st['p50_short_s']:.2f} s "
            f"| {1 / b['p50_short_ratio']:.2f} |",
            f"| p50 latency, long requests (64 tokens) | {c['p50_long_s']:.2f} s | {st['p50_long_s']:.2f} s "
            f"| {c['p50_long_s'] / st['p50_long_s']:.2f} |",
            "",
        ]
    if "http" in s:
        h = s["http"]
        t = h["tokens_per_s"]
        out += [
            "| the same 8 requests, tokens/s | in-process engine | HTTP server | HTTP / in-process |",
            "|---|---|---|---|",
        ]
        for conc in ("1", "8"):
            out.append(
                f"| concurrency {conc} | {t[f'in-process, concurrency {conc}']:.1f} "
                f"| {t[f'HTTP, concurrency {conc}']:.1f} | **{h['http_vs_in_process'][conc]:.3f}** |"
            )
        out += [
            f"| server resident memory, idle / peak | | {h['rss_idle_mb']:.0f} / "
            f"{h['rss_under_load_peak_mb']:.0f} MiB | |",
            "",
        ]
    if "peers" in s:
        p = s["peers"]
        systems = list(p["batch 1"])
        out += [
            "| `model.generate`, same vector on every layer, tokens/s | batch 1 | batch 8 |",
            "|---|---|---|",
        ]
        for n in systems:
            out.append(f"| {n} | {p['batch 1'][n]:.1f} | {p['batch 8'][n]:.1f} |")
        out += ["", "| 8 requests with 8 different vectors | tokens/s |", "|---|---|"]
        out += [f"| {n} | {v:.1f} |" for n, v in p["8 requests, 8 different vectors"].items()]
        out.append("")
    return "\n".join(out)


def training_table(t: dict) -> str:
    red, lora = t["rows"]
    rows = [
        ("trainable parameters", "trainable_params", "{:,.0f}"),
        ("step time, s (median)", "step_s_median", "{:.2f}"),
        ("peak resident memory, MiB", "peak_rss_mb", "{:.0f}"),
        ("… of which training (peak − loaded model)", "peak_over_loaded_mb", "{:.0f}"),
        ("held-out loss before", "eval_loss_before", "{:.3f}"),
        ("held-out loss after", "eval_loss_after", "{:.3f}"),
    ]
    lines = [
        f"| {t['steps']} steps × {t['batch_size']} examples | RED | LoRA r8 (peft) | RED / LoRA |",
        "|---|---|---|---|",
    ]
    for name, key, fmt in rows:
        lines.append(
            f"| {name} | {fmt.format(red[key])} | {fmt.format(lora[key])} | {red[key] / lora[key]:.3f} |"
        )
    return "\n".join(lines)


def sweep_table(s: dict) -> str:
    med = s["median_s"]
    return "\n".join(
        [
            f"| {s['max_new_tokens']} new tokens, {s['quantization']} | one request | sweep of "
            f"{len(s['strengths'])} | sweep / one |",
            "|---|---|---|---|",
            f"| this run | {med['single']:.1f} s | {med['sweep']:.1f} s | **{s['ratio']:.2f}** |",
        ]
    )


def compute_table(c: dict) -> str:
    strengths = list(next(iter(c["methods"].values()))["accuracy"])
    lines = [
        "| vector computed from the tone pairs | " + " | ".join(strengths) + " |",
        "|---" * (len(strengths) + 1) + "|",
    ]
    for method, m in c["methods"].items():
        lines.append(f"| `{method}` | " + " | ".join(f"{m['accuracy'][w]:.1f} %" for w in strengths) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args()
    for name, fn in (
        ("hooks.json", hooks_table),
        ("serving.json", serving_tables),
        ("sweep.json", sweep_table),
        ("training.json", training_table),
        ("compute.json", compute_table),
    ):
        data = _load(args.out_dir / name)
        print(f"<!-- {name} -->")
        print(fn(data) if data is not None else f"(no {name}: run make bench / make eval)")
        print()
    md = args.out_dir / "alignment.md"
    print("<!-- alignment.md -->")
    print(md.read_text() if md.exists() else "(no alignment.md: run python bench/eval_alignment.py)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
