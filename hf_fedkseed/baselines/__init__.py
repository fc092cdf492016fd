"""The methods FedKSeed is compared with: FedZO (fresh seeds), FedIT (LoRA) and FedAvg (backprop), one runtime."""

from .fedavg import FedAvgCallback, decode_tensors, encode_tensors
from .fedit import apply_lora, load_quantized_model, quantization_unavailable
from .fedzo import FreshSeedZOOptimizer, SeedStepsMessage, encode_seed_history, replay_seed_steps
from .setup import BASELINE_METHODS, BaselineSetup, prepare_baseline

__all__ = [
    "BASELINE_METHODS",
    "BaselineSetup",
    "FedAvgCallback",
    "FreshSeedZOOptimizer",
    "SeedStepsMessage",
    "apply_lora",
    "decode_tensors",
    "encode_seed_history",
    "encode_tensors",
    "load_quantized_model",
    "prepare_baseline",
    "quantization_unavailable",
    "replay_seed_steps",
]
