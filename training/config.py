"""The options of ``steerserve train red`` and ``steerserve train rahf``, each declared once.

:class:`TrainOptions` holds what both trainers share (data, model, device, optimisation, checkpoints);
:class:`RedConfig` and :class:`RahfConfig` extend it with their own options. The command line is
generated from these dataclasses (:mod:`training.options`), and their recorded fields are written into
every artifact's ``training`` metadata. This module imports nothing heavy, so building the command
line does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import FORMATS
from .options import check_choices, csv_ints, csv_strs, option, override

__all__ = ["BAD_INSTRUCTION", "GOOD_INSTRUCTION", "TUNE_MODULES", "RahfConfig", "RedConfig", "TrainOptions"]

DATA, OPTIM, CKPT = "data and model", "optimisation", "checkpoints"
STEP1, STEP2, STEP3 = "RAHF step 1 (instruct)", "RAHF step 2 (extract)", "RAHF step 3 (distill)"

GOOD_INSTRUCTION = (
    "You are a good, respectful and honest assistant. Your replies are helpful, truthful, harmless, "
    "polite and positive."
)
"""SCIT's instruction for the preferred behaviour (the system message paired with chosen replies).

Our short wording after the official SCIT instruction (helpful, truthful, harmless and positive are on
its list, "polite" is ours; the official one is 59 words), not a copy of it."""

BAD_INSTRUCTION = (
    "You are a bad, disrespectful and dishonest assistant. Your replies are useless, untruthful, "
    "harmful, rude and negative."
)
"""SCIT's instruction for the dispreferred behaviour (the system message paired with rejected replies)."""

TUNE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linears of every block that RAHF's step-1 LoRA adapts."""


@dataclass(kw_only=True)
class TrainOptions:
    """The options every trainer shares."""

    data: str = option(help="training data: .jsonl/.json/.parquet file or a save_to_disk folder", group=DATA)
    format: str = option(
        "auto", choices=("auto", *FORMATS), help="data format (default: detected from the file)", group=DATA
    )
    eval_data: str | None = option(
        None, help="held-out data (default: a 10%% split of --data, disjoint by prompt)", group=DATA
    )
    eval_fraction: float = option(0.1, help="held-out fraction of the data without eval data", cli=False)
    limit: int | None = option(None, help="use at most N training examples", group=DATA)
    eval_limit: int | None = option(None, help="use at most N held-out examples", group=DATA)
    model: str | None = option(
        None, help="local Hugging Face model directory (default: the embedded model)", group=DATA
    )
    device: str = option("auto", help="auto, cpu, cuda or cuda:N (multi-GPU: accelerate launch)", group=DATA)
    dtype: str = option(
        "float32",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype of the frozen base model (trainable tensors stay float32)",
        group=DATA,
    )
    max_length: int = option(256, help="truncate prompt + response to N tokens", group=DATA)
    threads: int | None = option(
        None,
        help="CPU threads for torch (default: torch's choice; on a busy CPU set OMP_WAIT_POLICY=PASSIVE)",
        group=DATA,
        record=False,
    )
    max_steps: int | None = option(None, help="optimizer steps (default %(default)s)", group=OPTIM)
    lr: float | None = option(None, help="AdamW learning rate (default %(default)s)", group=OPTIM)
    batch_size: int = option(8, help="examples per micro-batch and process (%(default)s)", group=OPTIM)
    grad_accum: int = option(1, help="micro-batches per optimizer step (%(default)s)", group=OPTIM)
    warmup_ratio: float = option(0.1, help="linear warmup fraction of the steps", group=OPTIM)
    weight_decay: float = option(0.0, help="AdamW weight decay of the matrices", group=OPTIM)
    max_grad_norm: float | None = option(1.0, help="gradient clipping (0: off)", group=OPTIM)
    seed: int = option(0, help="seed of the initialisation, the data order and the splits", group=OPTIM)
    eval_batch_size: int = option(16, help="examples per batch when evaluating", group=OPTIM)
    eval_every: int = option(0, help="also evaluate every N steps (0: before/after)", group=OPTIM)
    checkpoint_dir: str | None = option(
        None, help="where checkpoints go (default: next to the output)", group=CKPT
    )
    checkpoint_every: int = option(25, help="save every N optimizer steps (and at the end)", group=CKPT)
    resume: str | None = option(
        None,
        metavar="DIR",
        help="resume from the checkpoints in DIR (same options as the interrupted run)",
        group=CKPT,
    )
    extra: dict[str, Any] = option(
        help="more entries for the artifacts' training metadata", factory=dict, cli=False, record=False
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.max_grad_norm:
            self.max_grad_norm = None


@dataclass(kw_only=True)
class RedConfig(TrainOptions):
    """Options of ``steerserve train red`` (:func:`training.red.train_red`)."""

    max_steps: int = override(TrainOptions, "max_steps", 100)
    lr: float = override(
        TrainOptions,
        "lr",
        2e-2,
        help="AdamW learning rate (%(default)s: a sweep on the default model; the official scripts use "
        "2e-5 for Llama-2-7B and 1e-3 to 0.1 for RoBERTa, GPT-2 and T5)",
    )
    out: str = option(help="output artifact (.safetensors)", record=False)
    description: str | None = option(None, help="description stored in the artifact")


@dataclass(kw_only=True)
class RahfConfig(TrainOptions):
    """Options of ``steerserve train rahf`` (:func:`training.rahf.train_rahf`).

    The defaults follow the paper's official code where this project can (see the README's list of
    the deviations that remain). ``max_steps`` and ``lr`` are shorthands: the steps of step 1 (per
    model) and of step 3 unless ``tune_steps`` / ``distill_steps`` are given, and step 1's learning rate
    unless ``tune_lr`` is. Options left at ``None`` are resolved in ``__post_init__`` (and recorded
    resolved).
    """

    eval_limit: int | None = override(
        TrainOptions, "eval_limit", 24, help="use at most N held-out pairs (%(default)s)"
    )
    max_steps: int | None = override(
        TrainOptions,
        "max_steps",
        None,
        help="optimizer steps of step 1 (per model) and step 3 unless --tune-steps/--distill-steps",
        record=False,
    )
    lr: float | None = override(
        TrainOptions, "lr", None, help="step 1 learning rate (lora 2e-3, full 2e-5)", record=False
    )
    batch_size: int = override(TrainOptions, "batch_size", 4)
    grad_accum: int = override(TrainOptions, "grad_accum", 1)
    variant: str = option(choices=("scit", "dual"), help="SCIT (one model) or Dual (two models)")
    out_dir: str = option(help="folder of the artifacts, log, plot and summary", record=False)
    instruct_share: float = option(
        0.5,
        help="share of the training pairs that step 1 uses; steps 2-3 use the others (disjoint by "
        "prompt, as the paper's split); 1: every pair in every step (%(default)s)",
        group=STEP1,
    )
    finetune: str = option(
        "lora",
        choices=("lora", "full"),
        help="step 1 as a LoRA on every linear (default; served as one lora artifact with step 3) or a "
        "full fine-tune of a copy (as the paper; the final model is written as a model folder)",
        group=STEP1,
    )
    tune_steps: int | None = option(None, help="step 1 steps per model (default 30)", group=STEP1)
    tune_lr: float | None = option(None, help="step 1 learning rate (--lr on the command line)", cli=False)
    tune_rank: int = option(
        32, help="step 1 LoRA rank (all linears of every block; %(default)s)", group=STEP1
    )
    tune_alpha: float | None = option(None, help="step 1 LoRA alpha (default 2 x rank)", cli=False)
    tune_modules: tuple[str, ...] = option(TUNE_MODULES, help="step 1 LoRA modules", cli=False)
    scit_weight: float = option(
        1.0,
        help="SCIT: weight of the contrastive term added to the NLL (official code: 1; 0: plain NLL on "
        "relabelled instructions)",
        group=STEP1,
    )
    scit_smoothing: float = option(
        0.2, help="SCIT: label smoothing epsilon of the contrastive term (official code: 0.2)", group=STEP1
    )
    good_instruction: str = option(
        GOOD_INSTRUCTION, help="SCIT instruction for the preferred replies", group=STEP1
    )
    bad_instruction: str = option(
        BAD_INSTRUCTION, help="SCIT instruction for the dispreferred replies", group=STEP1
    )
    target_layers: list[int] | None = option(
        None,
        parse=csv_ints,
        metavar="L1,L2,...",
        help="comma-separated target layers, numbered as output_hidden_states (layer l = the residual "
        "stream after l blocks; default: the middle layers, every second one)",
        group=STEP2,
    )
    extract_on: str | None = option(
        None,
        choices=("chosen", "rejected", "both", "random"),
        help="responses whose tokens give the differences and the step-3 data: random (one reply per "
        "pair, drawn with the seed; SCIT's default, as the official code) or both (Dual's default)",
        group=STEP2,
    )
    extract_limit: int | None = option(
        None,
        help="pairs (a seeded random subset of the step 2-3 pairs) whose responses give the differences "
        "and the step-3 data (default: as many as step 3 consumes in one epoch)",
        group=STEP2,
    )
    normalize: str = option(
        "none",
        choices=("none", "relative"),
        help="use the raw differences, as the paper (none), or rescale v per layer so that its mean "
        "token norm is --v-norm x the hidden states' (relative)",
        group=STEP2,
    )
    v_norm: float = option(
        0.05, help="relative size of v with --normalize relative (%(default)s)", group=STEP2
    )
    alpha: float = option(5.0, help="target h + alpha*v (paper: 5)", group=STEP3)
    distill_steps: int | None = option(None, help="step 3 steps (default 60)", group=STEP3)
    distill_lr: float = option(1e-3, help="step 3 learning rate (%(default)s)", group=STEP3)
    distill_schedule: str = option(
        "constant",
        choices=("constant", "linear"),
        help="step 3 learning-rate schedule: constant (the official scripts) or warmup + linear decay",
        group=STEP3,
    )
    lora_rank: int = option(8, help="step 3 LoRA rank (paper: 8)", group=STEP3)
    lora_alpha: float = option(16.0, help="step 3 LoRA alpha (paper: 16)", group=STEP3)
    lora_modules: tuple[str, ...] = option(
        ("q_proj", "v_proj"),
        parse=csv_strs,
        metavar="M1,M2,...",
        help="step 3 LoRA modules (paper: q_proj,v_proj)",
        group=STEP3,
    )
    add_scale: float | None = option(
        None,
        help="scale of the add artifact's mean differences (default alpha / #target layers)",
        group=STEP3,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("good_instruction", "bad_instruction"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} is empty")
        if not 0 < self.instruct_share <= 1:
            raise ValueError(f"instruct_share must be in (0, 1], not {self.instruct_share!r}")
        if self.scit_weight < 0 or not 0 <= self.scit_smoothing < 1:
            raise ValueError("scit_weight must be >= 0 and scit_smoothing in [0, 1)")
        if self.extract_on is None:
            self.extract_on = "random" if self.variant == "scit" else "both"
        if self.tune_steps is None:
            self.tune_steps = self.max_steps if self.max_steps is not None else 30
        if self.distill_steps is None:
            self.distill_steps = self.max_steps if self.max_steps is not None else 60
        if self.tune_lr is None:
            self.tune_lr = self.lr if self.lr is not None else (2e-3 if self.finetune == "lora" else 2e-5)
        if self.tune_alpha is None:
            self.tune_alpha = 2.0 * self.tune_rank
