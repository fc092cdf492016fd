"""KSeedArtifactsCallback: the KSeed delta, the model card and a sha256 manifest in every checkpoint of a run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .configs import RecipeError
from .delta import KSEED_CONFIG_NAME, KSEED_DELTA_NAME, base_weights_sha256, save_kseed_delta
from .model_card import KSEED_METHODS, write_model_card

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "CheckpointError",
    "KSeedArtifactsCallback",
    "checkpoint_directories",
    "describe_base",
    "latest_complete_checkpoint",
    "resolve_resume_checkpoint",
    "run_summary",
    "verify_checkpoint",
    "write_checkpoint_manifest",
]

logger = logging.getLogger(__name__)

_STATE_NAME = "kseed_artifacts"
_EVAL_KEYS = ("rougeL_before", "rougeL_after", "eval_loss_before", "eval_loss_after", "num_eval_samples")
MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = "hf_fedkseed.checkpoint_manifest"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RecipeError):
    """A checkpoint that cannot be resumed from (incomplete or corrupted); the CLI prints it and exits with code 2."""


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    """Every regular file of a checkpoint but the manifest and hidden (temporary) files, sorted."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.name != MANIFEST_NAME
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def write_checkpoint_manifest(directory: str | Path) -> dict[str, Any]:
    """Write `checkpoint_manifest.json`: the size and sha256 of every file in a checkpoint, atomically and last.

    A checkpoint without it was cut short (a run killed while saving); `verify_checkpoint` checks it on resume.

    Returns:
        The manifest written.

    Example:
        >>> write_checkpoint_manifest("outputs/smoke/checkpoint-30")["files"]["model.safetensors"]["bytes"]
    """
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
        for path in _checkpoint_files(directory)
    }
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "files": files}
    temporary = directory / f".{MANIFEST_NAME}.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / MANIFEST_NAME)
    return manifest


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest: every listed file present, of the recorded size and sha256.

    Returns:
        The manifest.

    Raises:
        CheckpointError: for a missing directory or manifest (an incomplete checkpoint), an unreadable manifest,
            or a file that is missing, truncated or altered; the message names the file and the fix.

    Example:
        >>> verify_checkpoint("outputs/smoke/checkpoint-30")
    """
    directory = Path(directory)
    fix = "resume from another checkpoint (`--resume_from_checkpoint last` takes the newest complete one)"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} is not a directory; {fix}.")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has no {MANIFEST_NAME}: it is incomplete (the run stopped while saving "
            f"it) or was not written by hf_fedkseed; {fix}."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("not a checkpoint manifest")
        for entry in files.values():
            if not isinstance(entry["bytes"], int) or not isinstance(entry["sha256"], str):
                raise ValueError("malformed entry")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is corrupted ({error}); {fix}.") from None
    for name, entry in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint; {fix}.")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{file} has {size} bytes but {MANIFEST_NAME} records {entry['bytes']} (truncated or replaced); {fix}."
            )
        if _file_sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {MANIFEST_NAME} (corrupted); {fix}.")
    return manifest


def checkpoint_directories(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` directories of `output_dir`, newest (highest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(match[1]), path) for path in output_dir.iterdir() if (match := _CHECKPOINT_DIR.match(path.name))]
    return [path for _, path in sorted(found, reverse=True) if path.is_dir()]


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in `output_dir` that passes `verify_checkpoint`; incomplete or corrupted ones are skipped
    with a warning. None when there is none.

    Example:
        >>> trainer.train(resume_from_checkpoint=str(latest_complete_checkpoint("outputs/smoke")))
    """
    for directory in checkpoint_directories(output_dir):
        try:
            verify_checkpoint(directory)
        except CheckpointError as error:
            logger.warning("Skipping %s: %s", directory.name, error)
            continue
        return directory
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> str | None:
    """The verified checkpoint a run resumes from: a path, or `last` (the newest complete one in `output_dir`).

    Raises:
        CheckpointError: for a checkpoint that fails `verify_checkpoint`, or `last` with no complete checkpoint.

    Example:
        >>> resolve_resume_checkpoint("last", "outputs/smoke")
        'outputs/smoke/checkpoint-30'
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "last":
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"`resume_from_checkpoint: last` found no complete checkpoint in {str(output_dir)!r}; start the run "
                "without it, or pass a checkpoint directory."
            )
        return str(found)
    verify_checkpoint(resume_from_checkpoint)
    return str(resume_from_checkpoint)


def describe_base(model_args) -> tuple[str, str | None, str]:
    """(name, revision, source) of a run's base model; source is one of `hf_fedkseed.bases.BASE_SOURCES`.

    `hub`, `local`, `config` (built from scratch), or `gguf-local`, `gguf-hub`, `gguf-package` for a GGUF file
    (`hf_fedkseed.bases.base_record` adds the file and its sha256).

    Raises:
        BaseModelError: for a base that `hf_fedkseed.bases.resolve_base` refuses (missing package or file).
    """
    from .bases import resolve_base

    spec = resolve_base(model_args)
    return spec.name, spec.revision, spec.source


def run_summary(model_args, data_args, zo_args, federated_config, training_args, *, method: str | None = None):
    """The static description of a recipe's run that the card and the delta config record.

    Args:
        model_args, data_args, zo_args, federated_config, training_args: the recipe's dataclasses (any may be
            None; missing settings read "n/a" in the card).
        method: the method's name; default: a `method` field of the recipe if it has one, else `fedkseed_pro` or
            `fedkseed` from `federated_config.pro`.

    Returns:
        A JSON-serialisable dict.

    Example:
        >>> summary = run_summary(*parse_recipe("recipes/quickstart.yaml"))
    """
    if method is None:
        for source in (zo_args, federated_config, training_args, model_args, data_args):
            candidate = getattr(source, "method", None)
            if isinstance(candidate, str):
                method = candidate
                break
    pro = bool(getattr(federated_config, "pro", False))
    summary: dict[str, Any] = {"method": method or ("fedkseed_pro" if pro else "fedkseed")}
    if model_args is not None:
        from .bases import base_record

        summary.update(base_record(model_args))  # base_model, _revision, _source, _gguf_file, _gguf_sha256
    if data_args is not None:
        summary.update(
            dataset_name=data_args.dataset_name,
            dataset_format=data_args.dataset_format,
            max_length=data_args.max_length,
            prompt_format=getattr(data_args, "prompt_format", "alpaca"),
        )
    if zo_args is not None:
        summary.update(
            num_seeds=getattr(zo_args, "num_seeds", None),
            zo_eps=getattr(zo_args, "zo_eps", None),
            engine=getattr(zo_args, "engine_name", getattr(zo_args, "engine", None)),
            zo_estimator=getattr(zo_args, "zo_estimator", "two_point"),
            zo_directions=getattr(zo_args, "zo_directions", 1),
        )
    if federated_config is not None:
        summary.update(
            rounds=federated_config.rounds,
            local_steps=federated_config.local_steps,
            num_clients=federated_config.num_clients,
            clients_per_round=federated_config.clients_per_round,
            participation=federated_config.client_fraction,
            partition=federated_config.partition,
            pro=pro,
            sync_precision=getattr(federated_config, "sync_precision", "float32"),
        )
    if training_args is not None:
        summary.update(
            learning_rate=training_args.learning_rate,
            lr_scheduler_type=str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
            per_device_train_batch_size=training_args.per_device_train_batch_size,
            gradient_accumulation_steps=training_args.gradient_accumulation_steps,
            seed=training_args.seed,
            model_name=Path(training_args.output_dir).name if training_args.output_dir else None,
            hub_model_id=training_args.hub_model_id,
        )
    return summary


class KSeedArtifactsCallback(TrainerCallback):
    """Writes `kseed_config.json` + `kseed_delta.safetensors` and the model card (`README.md`) with every checkpoint.

    * `on_init_end` hashes the base weights (the model the Trainer receives), and the hash rides in the optimizer's
      state, so a resumed run still records its base, not the checkpoint's weights.
    * `on_save` writes the delta and the card into `OUTPUT/checkpoint-<step>`, then the checkpoint's manifest
      (`write_checkpoint_manifest`), last, so a checkpoint with a manifest that verifies is complete.
    * `on_push_begin` writes them into `OUTPUT` (and the checkpoint) before the Trainer uploads it.
    * `finish(trainer, results)` writes them into `OUTPUT` at the end of training with the evaluation results, and
      pushes with the Trainer when `push_to_hub=True`, keeping this card instead of the Trainer's generic one.

    For an optimizer other than `KSeedZOOptimizer` (baselines) no delta is written; the card still is.

    Args:
        summary: the run's description (`run_summary(...)`); at least `method`.
        federated: the run's `FederatedCallback`, whose round records give rounds and bytes to the card.

    Example:
        >>> artifacts = KSeedArtifactsCallback(run_summary(model_args, data_args, zo_args, fed_config, args),
        ...                                    federated=federated)
        >>> trainer = Trainer(..., callbacks=[federated, artifacts])
        >>> trainer.train()
        >>> artifacts.finish(trainer, results={"rougeL_after": 0.41})
    """

    def __init__(self, summary: dict[str, Any] | None = None, *, federated=None):
        self.summary = dict(summary or {})
        self.summary.setdefault("method", "fedkseed")
        self.federated = federated
        self.base_weights_sha256: str | None = None
        self.results: dict[str, Any] | None = None
        self._attached_to = None

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.base_weights_sha256 is None and self._is_kseed(kwargs.get("optimizer")):
            self.base_weights_sha256 = base_weights_sha256(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._is_kseed(optimizer):
            return
        optimizer = self._unwrap(optimizer)
        if self._attached_to is not optimizer:
            optimizer.attach_state(_STATE_NAME, self)  # hands back the base hash a checkpoint recorded
            self._attached_to = optimizer
        if self.base_weights_sha256 is None:
            if state.global_step == 0 and model is not None:
                self.base_weights_sha256 = base_weights_sha256(model)
            else:
                logger.warning(
                    "KSeedArtifactsCallback joined a resumed run without a recorded base hash; no KSeed delta will be "
                    "written. Add the callback when building the Trainer, before loading the checkpoint."
                )

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                self.write(checkpoint, args=args, state=state, optimizer=optimizer)
                write_checkpoint_manifest(checkpoint)  # last: its presence says the checkpoint is complete

    def on_push_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.is_world_process_zero:
            self.write(Path(args.output_dir), args=args, state=state, optimizer=optimizer)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():  # a checkpoint push uploads it right after this event
                self.write(checkpoint, args=args, state=state, optimizer=optimizer)
                write_checkpoint_manifest(checkpoint)

    # ------------------------------------------------------------------ state (saved inside the optimizer's)
    def state_dict(self) -> dict:
        return {"base_weights_sha256": self.base_weights_sha256}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("base_weights_sha256")
        if saved and self.base_weights_sha256 and saved != self.base_weights_sha256:
            logger.warning(
                "The checkpoint's base hash differs from the model the Trainer was built with; the delta keeps the "
                "checkpoint's base (%s), the one its accumulators are relative to.",
                saved,
            )
        if saved:
            self.base_weights_sha256 = saved

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _unwrap(optimizer):
        """The optimizer inside Accelerate's `AcceleratedOptimizer` (the Trainer wraps it when training starts)."""
        while optimizer is not None and not hasattr(optimizer, "accumulators") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        return optimizer

    @classmethod
    def _is_kseed(cls, optimizer) -> bool:
        from .optimizer import KSeedZOOptimizer

        return isinstance(cls._unwrap(optimizer), KSeedZOOptimizer)

    def current_summary(self, args=None, state=None) -> dict[str, Any]:
        """The summary with what the run has reached: steps, rounds, bytes and (after `finish`) evaluation."""
        summary = dict(self.summary)
        if state is not None:
            summary["global_step"] = state.global_step
        if args is not None:
            summary.setdefault("model_name", Path(args.output_dir).name)
            summary["hub_model_id"] = args.hub_model_id or summary.get("hub_model_id")
        federated = self.federated
        if federated is not None:  # FederatedCallback, or a baseline's runtime with the same round records
            history = list(getattr(federated, "history", None) or [])
            num_clients = getattr(getattr(federated, "partition", None), "num_clients", None)
            clients_per_round = getattr(federated, "clients_per_round", None)
            if num_clients and clients_per_round:
                summary.update(
                    num_clients=num_clients,
                    clients_per_round=clients_per_round,
                    participation=clients_per_round / num_clients,
                )
            summary["rounds_completed"] = len(history)
            per_client = [entry["bytes_per_client"] for entry in history if "bytes_per_client" in entry]
            summary["bytes_per_client_per_round"] = sum(per_client) / len(per_client) if per_client else None
            summary["total_bytes"] = sum(entry.get("bytes_up", 0) + entry.get("bytes_down", 0) for entry in history)
        if self.results is not None:
            summary["eval"] = {key: self.results.get(key) for key in _EVAL_KEYS}
            for key in ("bytes_per_client_per_round", "total_bytes"):
                if self.results.get(key) is not None:
                    summary[key] = self.results[key]
        return summary

    def write(self, directory: str | Path, *, args=None, state=None, optimizer=None) -> dict[str, Any] | None:
        """Write the delta (KSeed optimizers only) and the card into `directory`; returns the delta config or None.

        A stale delta in `directory` is removed when none can be written, so the card never describes files that
        belong to another state of the model.
        """
        directory = Path(directory)
        summary = self.current_summary(args, state)
        optimizer = self._unwrap(optimizer)
        config = None
        if self._is_kseed(optimizer) and summary["method"] in KSEED_METHODS and self.base_weights_sha256:
            try:
                config = save_kseed_delta(
                    optimizer,
                    directory,
                    base_weights_sha256=self.base_weights_sha256,
                    base_model=summary.get("base_model"),
                    base_model_revision=summary.get("base_model_revision"),
                    base_model_source=summary.get("base_model_source"),
                    base_model_gguf_file=summary.get("base_model_gguf_file"),
                    base_model_gguf_sha256=summary.get("base_model_gguf_sha256"),
                    training=summary,
                )
            except ValueError as error:  # weight decay: the model has no K-scalar description
                logger.warning("No KSeed delta for %s: %s", directory, error)
        if config is None:
            for name in (KSEED_CONFIG_NAME, KSEED_DELTA_NAME):
                (directory / name).unlink(missing_ok=True)
        write_model_card(directory, summary, repo_id=summary.get("hub_model_id"))
        return config

    def finish(self, trainer, results: dict[str, Any] | None = None):
        """End of a run: write the delta and the card (with `results`) into the output directory, then push if asked.

        Args:
            trainer: the `Trainer` that ran (its args, state and optimizer are read).
            results: the run's evaluation results (keys such as `rougeL_after`, `eval_loss_after`,
                `bytes_per_client_per_round`, `total_bytes`).

        Returns:
            The delta config, or None when the run has no KSeed delta.

        Raises:
            RuntimeError: if `push_to_hub=True` and the upload fails; every output is already on disk.
        """
        self.results = dict(results) if results is not None else None
        config = None
        if trainer.is_world_process_zero():
            config = self.write(
                Path(trainer.args.output_dir), args=trainer.args, state=trainer.state, optimizer=trainer.optimizer
            )
        if trainer.args.push_to_hub:
            from .hub import push_trainer_to_hub

            push_trainer_to_hub(trainer)
        return config
