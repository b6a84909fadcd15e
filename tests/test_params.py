"""Sampling settings: every bad value is refused naming its field; defaults from generation_config."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from server.engine.params import SamplingParams, generation_defaults


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": 2**63}, "seed"),
        ({"seed": True}, "seed"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
        ({"min_tokens": 200}, "min_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_values_and_normalisation():
    p = SamplingParams(
        stop="END", logit_bias={"42": -3, 7: 100}, top_k=2**31 - 1, n=16, top_logprobs=20, logprobs=True
    )
    assert p.stop == ("END",) and p.logit_bias == {42: -3.0, 7: 100.0}


def test_unset_fields_come_from_the_model_then_builtin():
    p = SamplingParams(top_p=0.5)
    r = p.resolved({"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1})
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.repetition_penalty) == (0.7, 0.5, 0, 0.0, 1.1)
    assert SamplingParams().resolved().greedy


def test_generation_config_values_apply_only_as_the_model_states_them():
    assert generation_defaults(GenerationConfig()) == {}
    sampled = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.05)
    assert generation_defaults(sampled) == {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.05}
    assert generation_defaults(GenerationConfig(temperature=0.6)) == {}  # not sampling: greedy stays
    assert generation_defaults(GenerationConfig(do_sample=True)) == {"temperature": 1.0}
