"""Integer hashing behind every seed: SplitMix64, the tuple hash `mix`, parameter-name keys and int32 views."""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from .base import canonical_name

__all__ = ["MASK64", "mix", "name_key", "splitmix64", "splitmix64_array", "to_int32"]

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap, well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """`splitmix64` of every element of a uint64 array (numpy's uint64 arithmetic wraps like the `& MASK64` above)."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers (each taken modulo 2**64): seeds one private generator per purpose.

    Example:
        >>> mix(1, 2) == splitmix64(splitmix64(0 ^ 1) ^ 2)
        True
    """
    value = 0
    for part in parts:
        value = splitmix64(value ^ (part & MASK64))
    return value


def to_int32(value: int) -> int:
    """The low 32 bits of an integer as the signed int32 value torch stores."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


@functools.lru_cache(maxsize=65536)
def name_key(name: str) -> int:
    """A 64-bit hash of a parameter's canonical name: the part of every engine's key that says which weight it is."""
    digest = hashlib.blake2b(canonical_name(name).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")
