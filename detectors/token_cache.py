"""Per-token response-span activations of many records at several layers, cached on disk.

Pooling other than the mean (max of rolling means, softmax pooling, a head over several pooled
projections) needs each token's activation, not the record's mean, and choosing among them by
cross-validation reads every record again for every fold. Reading is the slow part (a few hundred
tokens/s on two cores), so the response tokens are read once and kept as float16 — the halved
precision moves a projection by ~1e-3 of its spread, far below what separates the pooling choices.

The cache is written in chunks of records as they are read, so an interrupted read resumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detectors.activations import ActivationReader
from detectors.model_store import cache_root
from detectors.pooled import cache_key
from detectors.roles import RESPONSE
from detectors.transcripts import Transcript

CHUNK = 128


@dataclass(frozen=True)
class TokenSet:
    """Response-token activations of n records: record i is rows ``offsets[i]:offsets[i + 1]``."""

    layers: dict[int, np.ndarray]  # layer -> [N, d] float16
    offsets: np.ndarray  # [n + 1] int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row indices of the records ``idx`` (in that order) and their offsets."""
        lengths = self.lengths[idx]
        off = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        starts = self.offsets[:-1][idx]
        rows = np.repeat(starts - off[:-1], lengths) + np.arange(off[-1])
        return rows, off


def cache_dir(
    reader: ActivationReader,
    records: Sequence[Transcript],
    layers: Sequence[int],
    max_tokens: int | None,
) -> Path:
    return cache_root() / "tokens" / cache_key(reader, records, sorted(set(layers)), max_tokens)


def chunk_order(n_records: int) -> list[int]:
    """Chunks in the order they are read: shuffled, so a partly read cache samples every source."""
    return np.random.default_rng(0).permutation((n_records + CHUNK - 1) // CHUNK).tolist()


def read_chunks(
    reader: ActivationReader,
    records: Sequence[Transcript],
    layers: Sequence[int],
    chunks: Sequence[int],
    *,
    max_tokens: int | None = 160,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Read and store the chunks named (those not stored yet)."""
    layers = sorted(set(layers))
    root = cache_dir(reader, records, layers, max_tokens)
    root.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(records) + CHUNK - 1) // CHUNK
    for c in chunks:
        path = root / f"chunk_{c:04d}.npz"
        if path.is_file():
            continue
        per_layer: dict[int, list[np.ndarray]] = {lay: [] for lay in layers}
        lengths = []
        for acts in reader.read(
            records[c * CHUNK : (c + 1) * CHUNK],
            layers,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=f"tokens, chunk {c} of {n_chunks}",
        ):
            sel = acts.roles == RESPONSE
            if not sel.any():
                sel[:] = True
            lengths.append(int(sel.sum()))
            for lay in layers:
                per_layer[lay].append(acts.layers[lay][sel].astype(np.float16))
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            lengths=np.asarray(lengths, np.int64),
            **{f"layer_{lay}": np.concatenate(v) for lay, v in per_layer.items()},
        )
        tmp.replace(path)


def response_tokens(
    reader: ActivationReader,
    records: Sequence[Transcript],
    layers: Sequence[int],
    *,
    max_tokens: int | None = 160,
    batch_size: int = 8,
    progress: bool = True,
    load_layers: Sequence[int] | None = None,
) -> TokenSet:
    """Response-span activations (all tokens for ``text`` records), read once and cached.

    ``load_layers`` (a subset of ``layers``) keeps memory down when only some are needed.
    """
    read_chunks(
        reader,
        records,
        layers,
        chunk_order(len(records)),
        max_tokens=max_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    root = cache_dir(reader, records, layers, max_tokens)
    return load_tokens(root, (len(records) + CHUNK - 1) // CHUNK, load_layers or layers)


def load_tokens(root: Path, n_chunks: int, layers: Sequence[int]) -> TokenSet:
    parts: dict[int, list[np.ndarray]] = {lay: [] for lay in layers}
    lengths = []
    for c in range(n_chunks):
        with np.load(root / f"chunk_{c:04d}.npz") as z:
            lengths.append(z["lengths"])
            for lay in layers:
                parts[lay].append(z[f"layer_{lay}"])
    lens = np.concatenate(lengths)
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return TokenSet({lay: np.concatenate(v) for lay, v in parts.items()}, offsets)
