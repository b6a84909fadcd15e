"""Steering tables: bounded by their configuration, grown atomically, budget formula exact."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_artifact, red_artifact, tiny_llama

from steering_vectors import (
    SlotsExhaustedError,
    VectorRef,
    compile_profile,
    install_steering,
    tables_budget_bytes,
)


def _compiled(model, *pairs):
    entries = [(VectorRef(name=f"v{i}", **kw), art) for i, (art, kw) in enumerate(pairs)]
    cfg = model.config
    return compile_profile(entries, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size)


def test_staging_changes_nothing_until_committed():
    model = tiny_llama()
    with install_steering(model, max_slots=8, initial_slots=2) as hooks:
        t = hooks.tables
        slot = hooks.acquire(_compiled(model, (red_artifact(model), {})))
        before = (t.cap, t.ffn_s.clone(), dict(t.lora))
        staged = t.stage(4, {(0, "q_proj"): 5})
        assert (t.cap, dict(t.lora)) == (before[0], before[2]) and torch.equal(t.ffn_s, before[1])
        t.commit(staged)
        assert t.cap == 4 and t.lora[(0, "q_proj")].rank == 8  # ranks grow in powers of two from 8
        assert torch.equal(t.ffn_s[:, : 2 * before[0]], before[1])  # contents kept
        hooks.release(slot)


def test_tables_stay_within_the_budget_formula_at_the_configured_maximum():
    model = tiny_llama()
    max_slots, max_rank = 4, 16
    modules = ("q_proj", "v_proj")
    with install_steering(model, max_slots=max_slots, initial_slots=2, max_profile_rank=max_rank) as hooks:
        slots = [
            hooks.acquire(_compiled(model, (lora_artifact(model, modules=modules, rank=16, seed=s), {})))
            for s in range(max_slots - 1)
        ]
        with pytest.raises(SlotsExhaustedError):
            hooks.acquire(_compiled(model, (lora_artifact(model, modules=modules, rank=3, seed=9), {})))
        sites = {key: hooks.layout.linear_shapes()[key] for key in hooks.tables.lora}
        budget = tables_budget_bytes(
            num_layers=2,
            hidden_size=64,
            max_slots=max_slots,
            max_rank=max_rank,
            lora_sites=sites,
            element_size=4,
        )
        assert hooks.tables.nbytes() == budget  # at the maximum, the formula is exact
        too_big = _compiled(model, (lora_artifact(model, modules=modules, rank=17), {}))
        with pytest.raises(ValueError, match="max_profile_rank 16"):
            hooks.check(too_big)
        for s in slots:
            hooks.release(s)
        assert hooks.tables.nbytes() == budget  # tables are kept for reuse, never grown past it
