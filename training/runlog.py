"""The loss log of a training run: an append-only JSON Lines file and its PNG plot.

Each record is one object: ``phase`` (the loop's name, e.g. ``red`` or ``distill``), ``step``, the
metrics of that step (``train_loss`` and ``lr`` after each optimizer step, ``eval_loss`` at
evaluations) and ``time_s`` since the log was opened.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["RunLog", "plot_log"]


class RunLog:
    """Append-only JSONL loss log and its PNG plot. Only the main process writes (``enabled``);
    ``append`` keeps an existing log (a resumed run), otherwise it is emptied."""

    def __init__(self, path: str | Path, enabled: bool = True, append: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.t0 = time.monotonic()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append or not self.path.exists():
                self.path.write_text("")

    def write(self, phase: str, step: int, **metrics: float) -> None:
        """Append one record."""
        if not self.enabled:
            return
        rec = {
            "phase": phase,
            "step": step,
            **{k: float(v) for k, v in metrics.items()},
            "time_s": round(time.monotonic() - self.t0, 3),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def plot(self, png: str | Path, title: str = "") -> Path | None:
        """:func:`plot_log` of this log (``None`` on processes that do not write)."""
        return plot_log(self.path, png, title) if self.enabled else None


def plot_log(log_path: str | Path, png: str | Path, title: str = "") -> Path:
    """Plot every ``*loss*`` series of a JSONL log against the step, one panel per phase; train losses
    as lines, eval losses as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        for k, v in rec.items():
            if "loss" in k and isinstance(v, (int, float)):
                series.setdefault((rec["phase"], k), []).append((rec["step"], v))
    phases = list(dict.fromkeys(p for p, _ in series))  # in order of first appearance
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(5.5 * max(1, len(phases)), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=False):
        for (p, k), pts in sorted(series.items()):
            if p != phase:
                continue
            xs, ys = zip(*sorted(pts), strict=False)
            style = {"marker": "o", "linestyle": "--"} if k.startswith("eval") else {"linewidth": 1}
            ax.plot(xs, ys, label=k, **style)
        ax.set_title(phase)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
