"""The real encoded bytes of one client's FedKSeed round (`message_bytes_report`, the table of docs/protocol.md)."""

from __future__ import annotations

from typing import Literal

import torch

from hf_fedkseed.federated import SyncMessage, UpdateMessage
from hf_fedkseed.federated.server import pro_probabilities
from hf_fedkseed.federated.sync_message import sync_value_dtype

__all__ = ["message_bytes_report"]


def message_bytes_report(
    num_seeds: int = 4096,
    num_steps: int = 200,
    *,
    pro: bool = False,
    pro_encoding: Literal["schedule", "log_uint8", "float32"] = "schedule",
    constant_lr: bool = True,
    changed_seeds: int | None = None,
    sync_precision: Literal["float32", "int8"] = "float32",
    seed: int = 0,
) -> dict[str, int]:
    """Encode a realistic round for one client and return the real encoded sizes in bytes.

    The accumulators, seed indices, projected gradients and Pro importances are drawn from a private generator
    seeded with `seed`; the sizes do not depend on the values, only on the shapes and the encodings.

    Args:
        num_seeds: K.
        num_steps: tau, the client's local steps in the round.
        pro: FedKSeed-Pro: the down message carries the Pro data, the update the projected grads and rate(s).
        pro_encoding: "schedule" (tau server-drawn seed indices), "log_uint8" or "float32" probabilities.
        constant_lr: one learning rate for the round (else a decaying rate per step, sent per step with Pro).
        changed_seeds: if set, the client synced before and this many accumulators changed since; the sync then
            takes the smaller of the full and the sparse form (float32 only: an int8 sync is always full).
        sync_precision: the accumulators' wire type, "float32" (the paper's) or "int8" (a scale and K codes).
        seed: seeds the private generator.

    Returns:
        `{"down": SyncMessage bytes, "up": UpdateMessage bytes, "total": their sum}`.

    Raises:
        ValueError: for an unknown `pro_encoding` or `sync_precision`, or a negative count.

    Example:
        >>> message_bytes_report(4096, 200)
        {'down': 16414, 'up': 1230, 'total': 17644}
        >>> message_bytes_report(4096, 200, sync_precision="int8")
        {'down': 4130, 'up': 1230, 'total': 5360}
    """
    if pro_encoding not in ("schedule", "log_uint8", "float32"):
        raise ValueError(f"Invalid `pro_encoding`: {pro_encoding!r}; choose 'schedule', 'log_uint8' or 'float32'.")
    if num_steps < 0 or (changed_seeds is not None and not 0 <= changed_seeds <= num_seeds):
        raise ValueError("`num_steps` must be >= 0 and `changed_seeds` in [0, num_seeds].")
    value_dtype = sync_value_dtype(sync_precision)
    generator = torch.Generator().manual_seed(seed)
    accumulators = torch.randn(num_seeds, generator=generator, dtype=torch.float64) * 1e-4
    extras: dict = {}
    if pro:
        importance = torch.randn(num_seeds, generator=generator, dtype=torch.float64).abs()  # mean |clip(g)|
        probabilities = pro_probabilities(importance)  # the server's FedKSeed-Pro distribution
        if pro_encoding == "schedule":
            extras["seed_schedule"] = torch.multinomial(probabilities, num_steps, replacement=True, generator=generator)
        else:
            extras["seed_probabilities"] = probabilities
            extras["probability_encoding"] = pro_encoding
    changed = None
    if changed_seeds is not None:
        changed = torch.randperm(num_seeds, generator=generator)[:changed_seeds]
    sync = SyncMessage.build(
        server_round=1,
        accumulators=accumulators,
        changed_indices=changed,
        base_round=0,
        value_dtype=value_dtype,
        **extras,
    ).encode()
    if pro and pro_encoding == "schedule":
        seed_indices = extras["seed_schedule"]
    else:
        seed_indices = torch.randint(num_seeds, (num_steps,), generator=generator)
    grads = torch.randn(num_steps, generator=generator, dtype=torch.float64)
    rates = 1e-6 if constant_lr else torch.linspace(1e-6, 5e-7, num_steps, dtype=torch.float64)
    update = UpdateMessage.from_steps(
        server_round=1,
        client_id=0,
        num_samples=1000,
        num_seeds=num_seeds,
        seed_indices=seed_indices,
        projected_grads=grads,
        learning_rates=rates,
        pro=pro,
    ).encode()
    return {"down": len(sync), "up": len(update), "total": len(sync) + len(update)}
