"""Per-record mean activations over the response span, cached on disk.

Reading is the slow part (a few hundred tokens/s on two cores), and layer sweeps, extraction,
benchmarks and rebuilds read the same records again, so the pooled means are kept under the cache
directory keyed by model, records, layers and truncation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from detectors.activations import ActivationReader, mean_pool
from detectors.model_store import cache_root
from detectors.transcripts import Transcript


def cache_key(
    reader: ActivationReader,
    records: Sequence[Transcript],
    layers: Sequence[int],
    max_tokens: int | None,
) -> str:
    h = hashlib.sha256()
    cfg = reader.model_dir / "config.json"
    weights = reader.model_dir / "model.safetensors"
    stamp = weights.stat().st_size if weights.exists() else 0
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    h.update(f"{reader.model_dir.resolve()}|{stamp}|{sorted(layers)}|{max_tokens}".encode())
    for r in records:
        h.update(r.model_dump_json().encode())
    return h.hexdigest()[:24]


def pooled_activations(
    reader: ActivationReader,
    records: Sequence[Transcript],
    layers: Sequence[int],
    *,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    progress: bool = True,
    cache: bool = True,
    desc: str = "reading activations",
) -> dict[int, np.ndarray]:
    """``{layer: [n, d]}`` response-span means (all tokens for ``text`` records)."""
    layers = sorted(set(layers))
    path = cache_root() / "activations" / f"{cache_key(reader, records, layers, max_tokens)}.npz"
    if cache and path.is_file():
        with np.load(path) as z:
            return {int(k.removeprefix("layer_")): z[k] for k in z.files}
    out: dict[int, list[np.ndarray]] = {lay: [] for lay in layers}
    for acts in reader.read(
        records, layers, max_tokens=max_tokens, batch_size=batch_size, progress=progress, desc=desc
    ):
        for lay in layers:
            out[lay].append(mean_pool(acts, lay))
    result = {lay: np.stack(v).astype(np.float32) for lay, v in out.items()}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{f"layer_{k}": v for k, v in result.items()})  # type: ignore[arg-type]
        tmp.replace(path)
        (path.with_suffix(".json")).write_text(
            json.dumps({"model": str(reader.model_dir), "n": len(records), "layers": layers})
        )
    return result
