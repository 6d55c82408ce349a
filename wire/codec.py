"""The one codec for ``StepBatch``: what the tap sends and what the sidecar accepts.

``step_batch`` builds a message from one step's concatenated arrays (the tap's publisher, and
``encode_step`` for rows given per request, as tests and benches write them); ``decode_rows`` and
``decode_batch`` check a message whole against the loaded bundle before any of it is used, so a
malformed batch raises ``BadInput`` and changes nothing.

Wire layout (proto/misalign/v1/monitor.proto): little-endian uint32 positions and token ids,
one int8 role per row (0 prompt, 1 response), float32 projections row-major ``[rows, k]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.errors import BadInput
from detectors.roles import PROMPT, RESPONSE
from wire import monitor_pb2 as pb

# The largest projection accepted. A projection is the residual stream's component along a unit
# direction, so no larger than the residual's norm, which in a working model stays orders of
# magnitude below this (fp16 holds nothing above 65,504). Beyond it is a broken or hostile
# sender: 3e38 is finite, and overflows every sum taken of it.
MAX_PROJECTION = 1e6


@dataclass(frozen=True)
class Rows:
    request_ids: list[str]
    offsets: np.ndarray  # [r + 1]
    meta: np.ndarray  # [n, 3] int64: position, token id, role (0 prompt, 1 response)
    projections: np.ndarray  # [n, k] float32

    @property
    def roles(self) -> np.ndarray:
        return self.meta[:, 2]


def _u32_count(data: bytes, field: str) -> int:
    """The uint32 values ``data`` holds."""
    if len(data) % 4:
        raise BadInput("row_count", f"{field} has {len(data)} bytes, not a whole number of uint32")
    return len(data) // 4


def decode_rows(
    loaded_id: str,
    loaded_k: int,
    bundle_id: str,
    k: int,
    projections: bytes,
    is_response: bytes,
    token_ids: bytes,
    positions: bytes | None = None,
    request_ids: list[str] | None = None,
    offsets: list[int] | np.ndarray | None = None,
) -> Rows:
    """Check and decode rows against the loaded bundle's id and width (passed in, not read off
    the bundle: ``Bundle.bundle_id`` hashes the whole bundle on each use)."""
    if bundle_id and bundle_id != loaded_id:
        raise BadInput(
            "unknown_bundle",
            f"bundle_id {bundle_id!r} is not the loaded bundle {loaded_id!r}",
        )
    if k != loaded_k:
        raise BadInput("wrong_width", f"k is {k}, the loaded bundle has {loaded_k} features")
    n = len(is_response)
    tok_n = _u32_count(token_ids, "token_ids")
    if tok_n != n:
        raise BadInput("row_count", f"token_ids has {tok_n} rows, is_response has {n}")
    pos_n = n if positions is None else _u32_count(positions, "positions")
    if pos_n != n:
        raise BadInput("row_count", f"positions has {pos_n} rows, is_response has {n}")
    if len(projections) != n * k * 4:
        raise BadInput(
            "wrong_width",
            f"projections has {len(projections)} bytes, expected rows x k x 4 = {n} x {k} x 4",
        )
    roles = np.frombuffer(is_response, dtype=np.int8)
    if n and roles.view(np.uint8).max() > RESPONSE:
        raise BadInput(
            "bad_role", f"is_response bytes must be {PROMPT} (prompt) or {RESPONSE} (response)"
        )
    proj = np.frombuffer(projections, dtype="<f4").reshape(n, k)
    # two passes, no temporary; NaN makes both comparisons false
    if n and not (proj.min() >= -MAX_PROJECTION and proj.max() <= MAX_PROJECTION):
        if not np.isfinite(proj).all():
            bad = int(np.argwhere(~np.isfinite(proj))[0][0])
            raise BadInput("non_finite", f"projections row {bad} holds NaN or infinite values")
        bad = int(np.argwhere(np.abs(proj) > MAX_PROJECTION)[0][0])
        raise BadInput(
            "out_of_range",
            f"projections row {bad} holds a value beyond +-{MAX_PROJECTION:g}, "
            "which no activation reaches",
        )
    ids = request_ids if request_ids is not None else [""]
    off = np.asarray(offsets if offsets is not None else [0, n], dtype=np.int64)
    if len(off) != len(ids) + 1:
        raise BadInput(
            "row_count",
            f"row_offsets has {len(off)} entries, expected len(request_ids) + 1 = {len(ids) + 1}",
        )
    if off[0] != 0 or off[-1] != n or (off[1:] < off[:-1]).any():
        raise BadInput(
            "row_count",
            f"row_offsets must rise from 0 to the row count {n}, got {off[0]}..{off[-1]}",
        )
    if request_ids is not None and (len(set(ids)) != len(ids) or not all(ids)):
        raise BadInput("bad_request_id", "request_ids must be non-empty and unique within a step")
    # Decoded straight into the columns of ``meta`` (no int64 temporaries to stack).
    meta = np.empty((n, 3), np.int64)
    if positions is None:
        meta[:, 0] = np.arange(n)
    else:
        meta[:, 0] = np.frombuffer(positions, dtype="<u4")
    meta[:, 1] = np.frombuffer(token_ids, dtype="<u4")
    meta[:, 2] = roles
    return Rows(ids, off, meta, proj)


def decode_batch(loaded_id: str, loaded_k: int, msg: pb.StepBatch) -> Rows:
    return decode_rows(
        loaded_id,
        loaded_k,
        msg.bundle_id,
        msg.k,
        msg.projections,
        msg.is_response,
        msg.token_ids,
        msg.positions,
        list(msg.request_ids),
        msg.row_offsets,
    )


def set_drops(
    msg: pb.StepBatch, rows_dropped: Mapping[str, int], steps_dropped: Mapping[str, int]
) -> pb.StepBatch:
    """Write the sender's cumulative drop counts (rows and steps, by reason) into ``msg``."""
    for reason, n in rows_dropped.items():
        msg.drops.rows_by_reason[reason] = n
    for reason, n in steps_dropped.items():
        msg.drops.steps_by_reason[reason] = n
    return msg


def step_batch(
    bundle_id: str,
    k: int,
    *,
    step: int = 0,
    sender_id: str = "",
    request_ids: Sequence[str] = (),
    offsets: Sequence[int] | np.ndarray = (0,),
    positions: Any = (),
    token_ids: Any = (),
    roles: Any = (),
    projections: Any = None,
    finished: Sequence[pb.FinishedRequest] = (),
    activated: bool = False,
    mitigation: Sequence[str] = (),
    mitigated: Any = None,
) -> pb.StepBatch:
    """One step batch from its concatenated rows: request i holds rows
    ``offsets[i]:offsets[i+1]``; ``projections`` is ``[rows, k]`` (None: no rows). Arrays may
    be numpy arrays or host tensors (numpy reads those in place)."""
    return pb.StepBatch(
        bundle_id=bundle_id,
        sender_id=sender_id,
        step=step,
        request_ids=list(request_ids),
        row_offsets=np.asarray(offsets, np.int64).tolist(),
        positions=np.asarray(positions, "<u4").tobytes(),
        token_ids=np.asarray(token_ids, "<u4").tobytes(),
        is_response=np.asarray(roles, np.int8).tobytes(),
        k=k,
        projections=(
            b"" if projections is None else np.ascontiguousarray(projections, "<f4").tobytes()
        ),
        finished=list(finished),
        activated=activated,
        mitigation=list(mitigation),
        mitigated=b"" if mitigated is None else np.asarray(mitigated, np.int8).tobytes(),
    )


def encode_step(
    bundle_id: str,
    k: int,
    requests: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    step: int = 0,
    sender_id: str = "",
    finished: list[pb.FinishedRequest] | None = None,
    rows_dropped: dict[str, int] | None = None,
    steps_dropped: dict[str, int] | None = None,
) -> pb.StepBatch:
    """One step batch from ``(request_id, positions, token_ids, roles, projections [m, k])`` rows."""
    offsets = [0]
    for _, pos, *_ in requests:
        offsets.append(offsets[-1] + len(pos))

    def cat(i: int) -> Any:
        return np.concatenate([r[i] for r in requests]) if requests else ()

    msg = step_batch(
        bundle_id,
        k,
        step=step,
        sender_id=sender_id,
        request_ids=[r[0] for r in requests],
        offsets=offsets,
        positions=cat(1),
        token_ids=cat(2),
        roles=cat(3),
        projections=cat(4) if requests else None,
        finished=finished or (),
    )
    return set_drops(msg, rows_dropped or {}, steps_dropped or {})
