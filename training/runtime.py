"""The process a training run executes in: threads, seeds, the ``accelerate`` device and the base model.

:func:`start` prepares a run from its options (CPU threads, seeds, accelerator); :func:`load_base_model`
loads the frozen base model through :mod:`basemodel` on the accelerator's device.
"""

from __future__ import annotations

import random
import resource
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import TrainOptions

__all__ = ["load_base_model", "make_accelerator", "peak_rss_mb", "set_seed", "start"]


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (the trainers use no other randomness)."""
    random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss is in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def make_accelerator(device: str = "auto"):
    """An ``accelerate.Accelerator`` for ``device``: ``auto`` (whatever accelerate finds: CUDA, one
    process per GPU under ``accelerate launch``, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if ":" in device:
            torch.cuda.set_device(int(device.split(":", 1)[1]))
    return Accelerator(cpu=device == "cpu")


def start(opts: TrainOptions):
    """Set torch's CPU threads (``opts.threads``, if given), seed the generators with ``opts.seed`` and
    return the accelerator for ``opts.device``."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    set_seed(opts.seed)
    return make_accelerator(opts.device)


def load_base_model(path: str | None, accelerator, dtype: str = "float32"):
    """Load the (unquantized) base model frozen in eval mode on the accelerator's device.

    Returns :class:`basemodel.LoadedModel`; ``path=None`` is the embedded default model.
    """
    from basemodel import load_model

    dev = accelerator.device
    device = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
    lm = load_model(path, quantization="none", dtype=dtype, device=device)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    lm.model.eval()
    return lm
