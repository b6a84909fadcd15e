"""The evaluation's own pieces: a peft LoRA converted to a steerserve artifact acts exactly like peft,
and distinct-2 is what its definition says."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from steering_vectors import Artifact, VectorRef, compile_profile, steering
from tests.helpers import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from align_baselines import peft_lora_tensors  # noqa: E402
from eval_alignment import distinct2  # noqa: E402


def test_peft_lora_served_through_hooks_matches_peft() -> None:
    base = tiny_llama()
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; give the adapter an effect
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    tensors = peft_lora_tensors(ref)
    assert sorted(tensors) == sorted(
        f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"
    )
    cfg = base.config
    art = Artifact(
        kind="lora",
        tensors=tensors,
        hidden_size=cfg.hidden_size,
        num_layers=2,
        model_type="llama",
        method="dpo",
        lora_alpha=16.0,
    )
    prof = compile_profile([(VectorRef("dpo"), art)], num_layers=2, hidden_size=cfg.hidden_size)
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        with steering(base) as hooks:
            with hooks.batch([hooks.acquire(prof)]):
                got = base(input_ids=ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the output...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ...and the hooks reproduce it


@pytest.mark.parametrize(
    ("texts", "expected"),
    [(["a b c d"], 1.0), (["a b a b a b"], 2 / 5), (["a b", "a b"], 1 / 2), (["one"], 0.0)],
)
def test_distinct2(texts: list[str], expected: float) -> None:
    assert distinct2(texts) == expected
