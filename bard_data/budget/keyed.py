"""Keyed randomness: uniform draws that are a pure function of (row key, seed, counter).

Every random choice about budgets (log-uniform schedules, balancing, the standard mix, RL
budgets) is drawn here, keyed by a stable hash of a row id, so results do not depend on row
order, shard size, Polars version or process.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

__all__ = ["stable_hash64", "uniform01"]

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def stable_hash64(values: list[str] | pl.Series) -> np.ndarray:
    """A 64-bit key per string (first 8 bytes of blake2b), stable across processes and versions."""
    vals = values.to_list() if isinstance(values, pl.Series) else list(values)
    out = np.empty(len(vals), dtype=_U64)
    for i, v in enumerate(vals):
        out[i] = int.from_bytes(hashlib.blake2b(str(v).encode("utf-8"), digest_size=8).digest(), "little")
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + _U64(0x9E3779B97F4A7C15)).astype(_U64)
        z = ((z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)).astype(_U64)
        z = ((z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)).astype(_U64)
        return (z ^ (z >> _U64(31))).astype(_U64)


def uniform01(keys: np.ndarray, seed: int, counter: np.ndarray | int = 0) -> np.ndarray:
    """Uniform floats in [0, 1), one per key, a pure function of (key, seed, counter)."""
    keys = np.asarray(keys, dtype=_U64)
    with np.errstate(over="ignore"):
        s = _splitmix64(np.full(1, int(seed) & _MASK64, dtype=_U64))[0]
        c = np.asarray(counter, dtype=np.int64).astype(_U64)
        x = _splitmix64(keys ^ s)
        x = _splitmix64((x + c * _U64(0xD1B54A32D192ED03)).astype(_U64))
    return (x >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))
