"""Applying a KSeed delta to a base model, after checking that the model's weights hash to the recorded base."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..perturbation import canonical_name
from .files import KSeedDelta, _check_accumulators, _dtype_counts, load_kseed_delta

__all__ = ["apply_kseed", "base_weights_sha256"]

_HASH_CHUNK = 1 << 22  # elements hashed per piece: a GPU parameter is copied to the host 16 MiB (float32) at a time


def base_weights_sha256(model: nn.Module | Iterable[tuple[str, torch.Tensor]], *, chunk_elements: int = _HASH_CHUNK):
    """A content hash of a model's weights: sha256 over the canonical name, dtype, shape and bytes of every parameter.

    Parameters are visited in sorted canonical-name order (so wrappers such as `torch.compile` or DDP do not change
    the hash) and streamed in chunks of `chunk_elements`, so no second copy of the model is made; a parameter on an
    accelerator is copied to the host one chunk at a time. Tied weights count once (`named_parameters()` dedups).

    Args:
        model: the model, or its `named_parameters()`.
        chunk_elements: elements hashed per piece.

    Returns:
        `"sha256:<64 hex digits>"`.

    Raises:
        ValueError: for a model without parameters, a parameter on the `meta` device, or two parameters with the same
            canonical name.

    Example:
        >>> base_weights_sha256(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"))
        'sha256:...'
    """
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    entries = sorted(((canonical_name(name), param) for name, param in named), key=lambda entry: entry[0])
    if not entries:
        raise ValueError("The model has no parameters to hash.")
    digest = hashlib.sha256()
    previous = None
    for name, param in entries:
        if name == previous:
            raise ValueError(f"Two parameters share the canonical name `{name}`; the hash cannot tell them apart.")
        previous = name
        if param.device.type == "meta":
            raise ValueError(f"Parameter `{name}` is on the meta device; load the weights before hashing them.")
        header = json.dumps([name, str(param.dtype).removeprefix("torch."), list(param.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        flat = param.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk_elements):
            piece = flat[start : start + chunk_elements].to("cpu").contiguous()
            digest.update(piece.view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()}"


def _trained_params(model: nn.Module, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    named = [(canonical_name(name), param) for name, param in model.named_parameters()]
    wanted = config["trained_parameters"]
    if wanted == "all":
        params = named
    else:
        by_name = dict(named)
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise ValueError(
                f"The model has no parameter {missing[0]!r} (and {len(missing) - 1} more) that the delta trained; "
                "load the base model the delta was made from."
            )
        params = [(name, by_name[name]) for name in wanted]
    if len(params) != config["num_trained_tensors"]:
        raise ValueError(
            f"The delta trained {config['num_trained_tensors']} parameter tensors but this model has {len(params)}; "
            f"load the base model it was made from ({config.get('base_model')})."
        )
    return params


def apply_kseed(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike | KSeedDelta,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Rebuild the tuned weights on a freshly loaded base model, in place: `w <- w0 - sum_j A_j z_j`.

    Everything is checked before any weight changes (the delta files as in `load_kseed_delta`, then the trained
    parameters, their dtypes and device type, and the content hash of the model's weights against the recorded
    base), so a refused delta leaves the model untouched.

    Args:
        model: the base model, loaded exactly as for training (same weights, same dtype, same device type).
        path_or_repo_id: a directory or Hub repo id holding the delta, or a `KSeedDelta`.
        revision: the Hub revision of the delta's repo.
        token: the Hub token (default: `HF_TOKEN` or the saved login).

    Returns:
        `model`, now holding the tuned weights.

    Raises:
        ValueError: for a delta that `load_kseed_delta` refuses, a model that is not the recorded base (another
            model, other weights, another dtype), or parameters on another device type than the one the delta was
            made on (the engine's z depends on it).

    Example:
        >>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M", dtype=torch.float32)
        >>> tuned = apply_kseed(base, "user/smollm2-fedkseed")
    """
    delta = path_or_repo_id if isinstance(path_or_repo_id, KSeedDelta) else None
    if delta is None:
        delta = load_kseed_delta(path_or_repo_id, revision=revision, token=token)
    config = delta.config
    engine = delta.engine
    params = _trained_params(model, config)
    dtypes = _dtype_counts(params)
    if dtypes != config["parameter_dtypes"]:
        raise ValueError(
            f"The delta was trained on parameters of dtypes {config['parameter_dtypes']} but this model holds "
            f"{dtypes}; load the base with the same dtype (e.g. `dtype=torch.float32`)."
        )
    device_types = {param.device.type for _, param in params}
    if device_types != {config["device_type"]} and not getattr(engine, "device_independent", False):
        raise ValueError(
            f"The delta was made on {config['device_type']!r} parameters and engine {engine.name!r} draws another z on "
            f"each device type; move the model to {config['device_type']!r} before `apply_kseed` (found "
            f"{sorted(device_types)})."
        )
    for name, param in params:
        if not param.is_contiguous():
            raise ValueError(f"Parameter `{name}` is not contiguous; call `.contiguous()` on it first.")
    base_hash = base_weights_sha256(model)
    if base_hash != config["base_weights_sha256"]:
        gguf = ""
        if config.get("base_model_gguf_file"):
            gguf = (
                f", GGUF file {config['base_model_gguf_file']!r} with {config.get('base_model_gguf_sha256')}, loaded "
                "with `hf_fedkseed.bases.load_base_model`"
            )
        raise ValueError(
            f"This model is not the base the delta was trained from: its weights hash to {base_hash} but the delta "
            f"records {config['base_weights_sha256']} (base {config.get('base_model')!r}, revision "
            f"{config.get('base_model_revision')!r}{gguf}). Load exactly that base, freshly (no other delta applied)."
        )
    _check_accumulators(
        delta.accumulators, "The delta"
    )  # load_kseed_delta checks it; a KSeedDelta built by hand may not
    coefficients = (-delta.accumulators).tolist()
    if not all(math.isfinite(value) for value in coefficients):
        raise ValueError("The delta holds non-finite accumulators.")
    with torch.no_grad():
        engine.replay_(params, delta.seed_pool.tolist(), coefficients)
    return model
