"""Training cost: RED vs LoRA (peft, rank 8) on the same data, steps, batches and training loop.

Both fine-tune the frozen default model on the sign-off instruction set
(``training/data/signoff_inst_{train,test}.jsonl``) with the project's loop (``training.loop.run_loop``:
AdamW, warmup + linear decay, clipping, the same seeded batch order), loss on the response tokens:

* RED: ``training.red.RedModel`` — scale and bias on every FFN output (2·L·d parameters), lr 2e-2 (this
  project's RED default, chosen by the sweep in the README; not a learning rate of the paper);
* LoRA: peft ``LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])``, lr 1e-3.

Each method runs in its own process, so that peak memory is its own: reported are trainable parameters,
the median optimizer-step time (from one batch build to the next; the mean over ``--repeats`` runs in the
order RED, LoRA, LoRA, RED), the peak resident memory and its growth over the loaded model, and the
held-out loss before and after (the runs are deterministic: every repeat gives the same losses).

Usage:  python bench/bench_training.py [--steps 30] [--batch-size 8]
Writes bench/out/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.demo import demo_path  # noqa: E402
from training.forward import response_nll  # noqa: E402
from training.loaders import load_instructions  # noqa: E402
from training.loop import LoopSpec, eval_loss, run_loop  # noqa: E402
from training.red import RedModel  # noqa: E402
from training.runtime import load_base_model, make_accelerator, peak_rss_mb, set_seed  # noqa: E402
from training.tokens import collate, encode_all  # noqa: E402

LR = {"red": 2e-2, "lora": 1e-3}


class LoraSFT(nn.Module):
    """A peft LoRA model whose ``forward`` returns ``(sum of response NLL, token count)`` like RED's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        self.model = get_peft_model(model, cfg)

    def forward(self, input_ids, attention_mask, labels, **_):
        return response_nll(self.model, input_ids, attention_mask, labels)


def run_one(method: str, args: argparse.Namespace) -> dict:
    """Train one method in this process and return its measurements."""
    set_seed(args.seed)
    acc = make_accelerator("cpu")
    lm = load_base_model(None, acc)
    rss_loaded = psutil.Process().memory_info().rss / 2**20
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train = encode_all(tok, load_instructions(demo_path("signoff_inst", "train")), 256)
    test = encode_all(tok, load_instructions(demo_path("signoff_inst", "test")), 256)
    module = RedModel(lm.model) if method == "red" else LoraSFT(lm.model)
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    stamps: list[float] = []

    def make_batch(idx):
        stamps.append(time.perf_counter())
        return collate([train[i] for i in idx], pad)

    before = eval_loss(module, test, pad, 16, acc.device)
    spec = LoopSpec(
        name=method,
        module=module,
        n_items=len(train),
        make_batch=make_batch,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=LR[method],
        seed=args.seed,
    )
    t0 = time.perf_counter()
    run_loop(spec, acc, desc=f"train {method}")
    wall = time.perf_counter() - t0
    stamps.append(time.perf_counter())
    after = eval_loss(module, test, pad, 16, acc.device)
    steps = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]  # skip the first (warm-up)
    return {
        "method": method,
        "trainable_params": n_params,
        "lr": LR[method],
        "step_s_median": statistics.median(steps),
        "train_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "rss_loaded_mb": rss_loaded,
        "peak_over_loaded_mb": peak_rss_mb() - rss_loaded,
        "eval_loss_before": before,
        "eval_loss_after": after,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="runs per method, in the order A B B A ...")
    ap.add_argument("--method", choices=("red", "lora"), help=argparse.SUPPRESS)  # internal: one child
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "training.json")
    args = ap.parse_args()
    if args.method:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
        print("RESULT " + json.dumps(run_one(args.method, args)), flush=True)
        return 0
    runs: dict[str, list[dict]] = {"red": [], "lora": []}
    # A B B A ...: a drift of the shared machine's speed hits both methods alike
    order = [m for i in range(args.repeats) for m in (("red", "lora") if i % 2 == 0 else ("lora", "red"))]
    for method in order:
        cmd = [
            sys.executable,
            __file__,
            "--method",
            method,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        runs[method].append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        row["step_s_median"] = statistics.fmean(r["step_s_median"] for r in rs)
        row["step_s_runs"] = [r["step_s_median"] for r in rs]
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row["peak_over_loaded_mb"] = max(r["peak_over_loaded_mb"] for r in rs)
        rows.append(row)
    red, lora = rows
    print(f"{args.steps} steps x {args.batch_size} examples, sign-off set, default model (float32, CPU)")
    print(f"{'':24}{'RED':>12}{'LoRA r8':>12}{'RED / LoRA':>12}")
    for key, fmt in (
        ("trainable_params", "{:,.0f}"),
        ("step_s_median", "{:.2f}"),
        ("peak_rss_mb", "{:.0f}"),
        ("peak_over_loaded_mb", "{:.0f}"),
        ("eval_loss_before", "{:.3f}"),
        ("eval_loss_after", "{:.3f}"),
    ):
        ratio = red[key] / lora[key] if lora[key] else float("nan")
        print(f"{key:24}{fmt.format(red[key]):>12}{fmt.format(lora[key]):>12}{ratio:>12.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "rows": rows}, indent=2
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
