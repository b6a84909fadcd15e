"""RAHF - Representation Alignment from Human Feedback (Liu et al., ACL 2024), trained offline.

Three steps, following the paper, each in a module of its own and run in order by :func:`train_rahf`
(:mod:`.pipeline`) over one :class:`~training.rahf.run.RahfRun`:

1. **Instructing the LM on the preferences** (:mod:`.instruct`). *SCIT*: one fine-tune of the base
   model on the chosen reply of every pair under a "good" instruction and the rejected reply under a
   "bad" one (:data:`~training.config.GOOD_INSTRUCTION`, :data:`~training.config.BAD_INSTRUCTION`, as
   the system message). *Dual*: a preferred model fine-tuned on the chosen replies and a dispreferred
   one on the rejected replies. Each fine-tune is a LoRA adapter (default; rank 8 on every linear of
   every block) or a full fine-tune of a copy (``finetune="full"``).
2. **Collecting the activity patterns** (:mod:`.extract`). The per-token difference v of the hidden
   states - the residual stream after block l, ``output_hidden_states[l + 1]`` - over the response
   tokens: SCIT = the tuned model under the good instruction minus the same model under the bad one;
   Dual = the preferred model minus the dispreferred one on the same input.
3. **Constructing the final model** (:mod:`.distill`). A LoRA adapter (rank 8, alpha 16, on
   ``q_proj``/``v_proj`` of every block up to the highest target layer) on the *base* model, trained
   so that at each target layer the hidden states of the response tokens move to
   ``h_base + alpha * v`` (alpha = 5), with the paper's loss: the L2 distance per token, averaged over
   the response tokens and the target layers.

Normalisation (a deviation from the paper, ``normalize="relative"``, the default): v is rescaled by one
factor per target layer so that its mean per-token norm is ``v_norm`` (0.05) times the mean norm of the
base model's hidden states there; directions and the token-to-token variation are kept. The raw
differences' size depends on how far the preference fine-tunes drifted, not only on the preference:
on SmolLM2-135M the raw Dual differences were 12-28 % of the hidden-state norm (SCIT's: 3-10 %), so
``h_base + 5 v`` asked for displacements larger than the hidden states themselves and the distilled
LoRA produced gibberish at strength 1. ``normalize="none"`` uses the raw differences, as the paper.

Target layers: the middle layers, every second one. For the 32-layer 7B Llamas the usual choice of
this recipe (RepE's LoRRA, which RAHF's step 3 follows) is 10, 12, ..., 20; :func:`default_target_layers`
scales that range (30 % .. 65 % of the depth) to the model: for the 30-layer SmolLM2-135M it gives
9, 11, 13, 15, 17, 19, so the LoRA sits on blocks 0..19. ``target_layers`` overrides it.

Outputs (:mod:`.outputs`, in ``out_dir``): ``lora.safetensors`` (kind ``lora``, the adapter of step 3)
and ``add.safetensors`` (kind ``add``, the mean differences, scaled), both with the training
configuration and their metrics in the metadata; a JSONL loss log, a PNG plot of every phase and
``summary.json`` next to them.
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
