"""The pretrained miniature base: training families only, deterministic, cached by its settings hash."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_fedkseed.pretrain import INFO_FILE, PretrainConfig, cached_base, main, pretrain_base

TINY = dict(steps=2, batch_size=2, warmup_steps=1)


def test_settings_are_validated_and_change_the_hash():
    with pytest.raises(ValueError, match="`steps`"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="`learning_rate`"):
        PretrainConfig(learning_rate=float("nan"))
    assert PretrainConfig().hash() == PretrainConfig().hash()
    assert PretrainConfig(seed=1).hash() != PretrainConfig().hash()


@pytest.mark.slow
def test_pretraining_is_deterministic_cached_and_sees_only_training_families(tmp_path):
    config = PretrainConfig(**TINY)
    first = pretrain_base(tmp_path / "a", config)
    info = json.loads((first / INFO_FILE).read_text())
    assert info["hash"] == config.hash() and info["train_rows"] == 6 * 48
    assert not set(info["train_task_families"]) & set(info["held_out_task_families"])
    assert info["held_out_task_families"] == ["task007_write_word_twice", "task008_first_letter_upper_case"]
    weights = load_file(first / "model.safetensors")

    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert pretrain_base(tmp_path / "a", config) == first  # cached: not retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert cached_base(tmp_path / "a", PretrainConfig(**{**TINY, "seed": 1})) is None

    again = load_file(pretrain_base(tmp_path / "b", config) / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights)  # same settings, same weights
    other = load_file(pretrain_base(tmp_path / "c", PretrainConfig(**{**TINY, "seed": 1})) / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], other["lm_head.weight"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.vocab_size == 384


def test_command_line_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--steps", "0"])
    assert exit_info.value.code == 2
    assert "`steps`" in capsys.readouterr().err
