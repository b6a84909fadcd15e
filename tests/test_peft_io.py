"""steering_vectors.peft_io: a PEFT LoRA adapter, saved by peft itself, converts to a ``lora`` artifact that
the serving hooks apply exactly as peft's own forward does; what cannot be expressed is refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from peft import LoraConfig, get_peft_model

from steering_vectors import VectorRef, compile_profile, load_artifact, steering
from steering_vectors.artifact import ArtifactError
from steering_vectors.peft_io import import_peft, peft_lora_tensors
from steerserve.cli import main as cli

IDS = torch.tensor([[1, 5, 9, 200, 31, 7], [4, 4, 8, 15, 16, 23]])


def saved_adapter(tmp_path: Path, base, **config) -> tuple[Path, torch.nn.Module]:
    """A peft LoRA on ``base`` with random B (peft starts B at zero), saved with ``save_pretrained``."""
    config = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    folder = tmp_path / "adapter"
    ref.save_pretrained(folder)
    return folder, ref


def skeleton(base):
    with torch.device("meta"):
        return type(base)(base.config)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj", "up_proj"]},
        {"use_rslora": True},
        {"layers_to_transform": [1], "lora_dropout": 0.1},
    ],
)
def test_import_reproduces_peft_forward(tmp_path, config):
    base = tiny_llama()
    folder, ref = saved_adapter(tmp_path, base, **config)
    art = import_peft(folder, skeleton(base))  # only the structure is read: a meta-device model will do
    assert art.kind == "lora" and art.method == "peft-import"
    n = base.config.num_hidden_layers
    prof = compile_profile([(VectorRef("peft"), art)], num_layers=n, hidden_size=base.config.hidden_size)
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        plain = base(input_ids=IDS).logits
        with steering(base) as hooks, hooks.batch([hooks.acquire(prof)] * 2):
            got = base(input_ids=IDS).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the output...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ...and the hooks reproduce it


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"v_proj": 4}}, "alpha_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
        ({"r": 8}, "r=8 but layers.0.q_proj.lora_A has rank 4"),
    ],
)
def test_what_a_lora_artifact_cannot_express_is_refused(tmp_path, changes, message):
    base = tiny_llama()
    folder, _ = saved_adapter(tmp_path, base)
    _edit_config(folder, **changes)
    with pytest.raises(ArtifactError, match=message):
        import_peft(folder, skeleton(base))


def test_modules_outside_the_decoder_blocks_are_refused(tmp_path):
    base = tiny_llama()
    folder, _ = saved_adapter(tmp_path, base, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ArtifactError, match="lm_head.base_layer.weight' is not a LoRA A/B weight"):
        import_peft(folder, skeleton(base))  # peft saved the tied embedding beside the adapter
    outside = {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(ArtifactError, match="'lm_head' is not inside a decoder block"):
        peft_lora_tensors(outside, skeleton(base))
    unknown = {"base_model.model.model.layers.0.mlp.act_fn.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(ArtifactError, match="'model.layers.0.mlp.act_fn' is not a linear layer"):
        peft_lora_tensors(unknown, skeleton(base))


def test_weights_of_another_model_are_refused(tmp_path):
    folder, _ = saved_adapter(tmp_path, tiny_llama())
    with pytest.raises(ArtifactError, match=r"has shape \[4, 64\], expected \[4, 32\]"):
        import_peft(folder, skeleton(tiny_llama(hidden=32)))


def test_a_pickled_adapter_is_never_loaded(tmp_path):
    base = tiny_llama()
    folder, _ = saved_adapter(tmp_path, base)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="adapter_model.bin is a pickle and is never loaded"):
        import_peft(folder, skeleton(base))
    with pytest.raises(ArtifactError, match="adapter_config.json not found"):
        import_peft(tmp_path, skeleton(base))


def test_cli_import_peft(tmp_path, capsys, tokenizer):
    base = tiny_llama()
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    folder, _ = saved_adapter(tmp_path, base, use_rslora=True)
    out = tmp_path / "lora.safetensors"
    assert cli(["vectors", "import-peft", str(folder), str(out), "--model", str(model_dir)]) == 0
    art = load_artifact(out)
    assert art.kind == "lora" and art.lora_alpha == pytest.approx(16 * 2.0)  # rsLoRA: alpha * sqrt(r)
    assert "modules ['q_proj', 'v_proj']" in capsys.readouterr().out
    _edit_config(folder, use_dora=True)
    assert cli(["vectors", "import-peft", str(folder), str(out), "--model", str(model_dir)]) == 2
    assert "DoRA" in capsys.readouterr().err
