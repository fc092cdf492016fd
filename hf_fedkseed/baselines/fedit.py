"""FedIT: LoRA adapters through `peft` (optional 8-bit or 4-bit base through `bitsandbytes`), averaged by FedAvg."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "adapter_parameters",
    "apply_lora",
    "load_quantized_model",
    "quantization_unavailable",
]

DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")  # FedIT's and the LoRA paper's choice for Llama


def _import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            'The `fedit` method needs `peft`; install it with `pip install "hf-fedkseed[peft]"`.'
        ) from error
    return peft


def apply_lora(
    model: torch.nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    seed: int = 0,
):
    """Wrap a causal LM in LoRA adapters (`peft.get_peft_model`); only the adapters are trainable afterwards.

    The adapters' random initialisation (A; B starts at zero) is drawn inside `torch.random.fork_rng` from `seed`,
    so the caller's global RNG does not move and every run with the same seed starts from the same adapters.

    Args:
        model: the base model (float, or quantized by `load_quantized_model`).
        r: LoRA rank (FedIT: 8).
        alpha: LoRA scaling numerator (FedIT: 16).
        dropout: LoRA dropout (FedIT: 0.05).
        target_modules: names of the linear layers that get adapters (FedIT: q_proj and v_proj).
        seed: seeds the adapter initialisation.

    Returns:
        The `peft.PeftModel`.

    Raises:
        ImportError: if `peft` is not installed (naming the extra to install).
        ValueError: for a rank below 1, or target modules the model does not have.

    Example:
        >>> model = apply_lora(AutoModelForCausalLM.from_pretrained(path), r=8, target_modules=["q_proj", "v_proj"])
        >>> model.print_trainable_parameters()
    """
    peft = _import_peft()
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"Invalid `lora_r`: {r!r}; the LoRA rank must be a positive integer.")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - names)
    if missing:
        raise ValueError(
            f"`lora_target_modules` {missing} are not modules of this model; pick from its linear layers, e.g. "
            f"{sorted(n for n in names if n.endswith('_proj'))}."
        )
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def quantization_unavailable(bits: int) -> str | None:
    """Why a `bits`-bit `bitsandbytes` base cannot be used here, or None when it can.

    Checks that `bitsandbytes` imports and that it has a backend for this machine: CUDA, or (recent releases) the
    CPU backend, probed by quantizing a small tensor.

    Example:
        >>> reason = quantization_unavailable(4)
        >>> print(reason or "4-bit base available")
    """
    if bits not in (4, 8):
        raise ValueError(f"Invalid quantization bits {bits!r}; use 4 or 8.")
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 'bitsandbytes is not installed (`pip install "hf-fedkseed[bnb]"`)'
    except Exception as error:  # a broken native library raises other errors at import
        return f"bitsandbytes failed to import: {type(error).__name__}: {error}"
    if torch.cuda.is_available():
        return None
    try:
        if bits == 4:
            import bitsandbytes.functional as functional

            functional.quantize_4bit(torch.randn(64, 64))
        else:
            bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)(torch.randn(2, 64))
    except Exception as error:
        return f"bitsandbytes {bnb.__version__} has no {bits}-bit backend for this CPU-only machine ({error})"
    return None


def load_quantized_model(model_name_or_path: str, *, bits: int, revision: str = "main"):
    """Load a causal LM with its linear layers quantized to `bits` bits by `bitsandbytes` (QLoRA-style base).

    Args:
        model_name_or_path: Hub id or directory of a saved model (a config alone cannot be quantized).
        bits: 4 (NF4, float32 compute) or 8 (LLM.int8).
        revision: the Hub revision.

    Raises:
        RuntimeError: if `quantization_unavailable(bits)` gives a reason (it is in the message).

    Example:
        >>> model = apply_lora(load_quantized_model("outputs/paper_miniature/base", bits=4))
    """
    reason = quantization_unavailable(bits)
    if reason is not None:
        raise RuntimeError(f"A {bits}-bit base is not available: {reason}. Drop `load_in_{bits}bit`.")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(
        model_name_or_path, revision=revision, quantization_config=quantization, device_map=device_map
    )


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable (LoRA) parameters of a `peft` model: what FedIT clients and server exchange."""
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]
