"""RAHF - Representation Alignment from Human Feedback (Liu et al., ACL 2024), trained offline.

Three steps, following the paper and its official code (``LiuAmber/RAHF``), each in a module of its
own and run in order by :func:`train_rahf` (:mod:`.pipeline`) over one :class:`~training.rahf.run.RahfRun`.
The training pairs are split in two, disjoint by prompt (``instruct_share`` = 0.5): step 1 learns from
one part, steps 2-3 from the other, as the official code splits its data.

1. **Instructing the LM on the preferences** (:mod:`.instruct`). *SCIT*: one fine-tune on the chosen
   reply of every pair under a "good" instruction and the rejected reply under a "bad" one
   (:data:`~training.config.GOOD_INSTRUCTION`, :data:`~training.config.BAD_INSTRUCTION`, as the system
   message), with the NLL plus the official code's contrastive term (weight ``scit_weight`` = 1, label
   smoothing ``scit_smoothing`` = 0.2). *Dual*: a preferred model fine-tuned on the chosen replies and
   a dispreferred one on the rejected replies. Each fine-tune is a LoRA adapter (default; rank 32 on
   every linear of every block - the paper fine-tunes all weights) or a full fine-tune of a copy
   (``finetune="full"``).
2. **Collecting the activity patterns** (:mod:`.extract`). The per-token difference v of the hidden
   states at the target layers over the response tokens: SCIT = the tuned model under the good
   instruction minus the same model under the bad one; Dual = the preferred model minus the
   dispreferred one on the same input. Layers are numbered as the official code numbers them,
   ``output_hidden_states[l]``: layer l is the output of block l - 1.
3. **Constructing the final model** (:mod:`.distill`). A LoRA adapter (rank 8, alpha 16, on
   ``q_proj``/``v_proj`` of the blocks below the highest target layer) on top of the step-1 model,
   trained so that at each target layer the hidden states of the response tokens move to
   ``h_tuned + alpha * v`` (alpha = 5; h_tuned: the step-1 model's hidden states on the plain input),
   with the paper's L2 loss, at a constant learning rate as the official scripts. The final model is
   step 1 plus step 3.

The raw differences are used by default, as the paper; ``normalize="relative"`` (ours) rescales them
per layer to ``v_norm`` times the hidden-state norm.

Target layers: the middle layers, every second one - for the 32-layer 7B models the official scripts
use 10..20 (Dual) and 10..18 (SCIT); :func:`default_target_layers` scales 30 %..65 % of the depth to
the model: for the 30-layer SmolLM2-135M 9, 11, ..., 19, so the step-3 LoRA sits on blocks 0..18.

Outputs (:mod:`.outputs`, in ``out_dir``): ``lora.safetensors`` (kind ``lora``: the final model, the
step-1 and step-3 adapters stacked into one) or, after a full fine-tune, ``model/``; ``add.safetensors``
(kind ``add``, the mean differences, scaled: a by-product of ours, not part of RAHF); a JSONL loss log,
a PNG plot of every phase and ``summary.json`` next to them.
"""

from ..config import BAD_INSTRUCTION, GOOD_INSTRUCTION, RahfConfig
from .extract import extract_differences
from .instruct import Runner
from .pipeline import train_rahf
from .run import default_target_layers

__all__ = [
    "BAD_INSTRUCTION",
    "GOOD_INSTRUCTION",
    "RahfConfig",
    "Runner",
    "default_target_layers",
    "extract_differences",
    "train_rahf",
]
