"""Decoding and checking step batches, and the bounded per-request state they fill.

A batch is checked whole before any of it is applied, so a malformed batch changes nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from detectors.bundle import Bundle
from service.rpc import monitor_pb2 as pb


class BadInput(Exception):
    """A message that cannot be used; ``reason`` is the metric label, the text names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Rows:
    request_ids: list[str]
    offsets: np.ndarray  # [r + 1]
    meta: np.ndarray  # [n, 3] int64: position, token id, role (0 prompt, 1 response)
    projections: np.ndarray  # [n, k] float32

    @property
    def roles(self) -> np.ndarray:
        return self.meta[:, 2]


def _u32(data: bytes, field: str) -> np.ndarray:
    if len(data) % 4:
        raise BadInput("row_count", f"{field} has {len(data)} bytes, not a whole number of uint32")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)


def decode_rows(
    bundle: Bundle,
    bundle_id: str,
    k: int,
    projections: bytes,
    is_response: bytes,
    token_ids: bytes,
    positions: bytes | None = None,
    request_ids: list[str] | None = None,
    offsets: list[int] | np.ndarray | None = None,
) -> Rows:
    if bundle_id and bundle_id != bundle.bundle_id:
        raise BadInput(
            "unknown_bundle",
            f"bundle_id {bundle_id!r} is not the loaded bundle {bundle.bundle_id!r}",
        )
    if k != bundle.k:
        raise BadInput("wrong_width", f"k is {k}, the loaded bundle has {bundle.k} features")
    n = len(is_response)
    tok = _u32(token_ids, "token_ids")
    if len(tok) != n:
        raise BadInput("row_count", f"token_ids has {len(tok)} rows, is_response has {n}")
    pos = np.arange(n, dtype=np.int64) if positions is None else _u32(positions, "positions")
    if len(pos) != n:
        raise BadInput("row_count", f"positions has {len(pos)} rows, is_response has {n}")
    if len(projections) != n * k * 4:
        raise BadInput(
            "wrong_width",
            f"projections has {len(projections)} bytes, expected rows x k x 4 = {n} x {k} x 4",
        )
    roles = np.frombuffer(is_response, dtype=np.int8)
    if n and (roles.max() > 1 or roles.min() < 0):
        raise BadInput("bad_role", "is_response bytes must be 0 (prompt) or 1 (response)")
    proj = np.frombuffer(projections, dtype="<f4").reshape(n, k)
    if not np.isfinite(proj).all():
        bad = int(np.argwhere(~np.isfinite(proj))[0][0])
        raise BadInput("non_finite", f"projections row {bad} holds NaN or infinite values")
    ids = request_ids if request_ids is not None else [""]
    off = np.asarray(offsets if offsets is not None else [0, n], dtype=np.int64)
    if len(off) != len(ids) + 1:
        raise BadInput(
            "row_count",
            f"row_offsets has {len(off)} entries, expected len(request_ids) + 1 = {len(ids) + 1}",
        )
    if off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
        raise BadInput(
            "row_count",
            f"row_offsets must rise from 0 to the row count {n}, got {off[0]}..{off[-1]}",
        )
    if request_ids is not None and (len(set(ids)) != len(ids) or not all(ids)):
        raise BadInput("bad_request_id", "request_ids must be non-empty and unique within a step")
    return Rows(ids, off, np.stack([pos, tok, roles.astype(np.int64)], axis=1), proj)


def decode_batch(bundle: Bundle, msg: pb.StepBatch) -> Rows:
    return decode_rows(
        bundle,
        msg.bundle_id,
        msg.k,
        msg.projections,
        msg.is_response,
        msg.token_ids,
        msg.positions,
        list(msg.request_ids),
        msg.row_offsets,
    )


@dataclass
class RequestState:
    """Rows of one request in growable buffers, so a step costs two copies, not new arrays."""

    k: int
    n: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    meta: np.ndarray = field(
        default_factory=lambda: np.empty((16, 3), np.int64)
    )  # pos, token, role
    proj: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.proj = np.empty((16, self.k), np.float32)

    def append(self, rows: Rows, s: int, e: int, now: float) -> None:
        need = self.n + e - s
        if need > len(self.meta):
            cap = max(need, 2 * len(self.meta))
            meta, proj = np.empty((cap, 3), np.int64), np.empty((cap, self.k), np.float32)
            meta[: self.n], proj[: self.n] = self.meta[: self.n], self.proj[: self.n]
            self.meta, self.proj = meta, proj
        self.meta[self.n : need] = rows.meta[s:e]
        self.proj[self.n : need] = rows.projections[s:e]
        self.n = need
        self.last_seen = now

    def ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, roles and projections by position; a position seen twice (recomputed after
        preemption) keeps its last write."""
        meta, proj = self.meta[: self.n], self.proj[: self.n]
        pos = meta[:, 0]
        if self.n > 1 and np.any(np.diff(pos) <= 0):
            # the last occurrence of each position: unique on the reversed array
            _, first_in_rev = np.unique(pos[::-1], return_index=True)
            idx = self.n - 1 - first_in_rev
            meta, proj = meta[idx], proj[idx]
        return meta[:, 1], meta[:, 2].astype(np.int8), proj


class RequestStore:
    """Per-request state, bounded in count, length and age."""

    def __init__(self, k: int, max_requests: int, max_tokens: int, timeout_s: float) -> None:
        self.k = k
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._live: OrderedDict[str, RequestState] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()  # recent ids, to spot duplicates

    def __len__(self) -> int:
        return len(self._live)

    def add(self, rows: Rows, now: float) -> dict[str, int]:
        """Append a batch's rows; returns rows dropped by reason (capacity, length, late)."""
        dropped: dict[str, int] = {}
        live = self._live
        off = rows.offsets
        for i, rid in enumerate(rows.request_ids):
            s, e = int(off[i]), int(off[i + 1])
            if s == e:
                continue
            st = live.get(rid)
            if st is None:
                if rid in self._finished:
                    dropped["after_finish"] = dropped.get("after_finish", 0) + e - s
                    continue
                if len(live) >= self.max_requests:
                    dropped["capacity"] = dropped.get("capacity", 0) + e - s
                    continue
                st = live[rid] = RequestState(self.k)
            else:
                live.move_to_end(rid)
            if st.n + (e - s) > self.max_tokens:
                dropped["too_long"] = dropped.get("too_long", 0) + e - s
                continue
            st.append(rows, s, e, now)
        return dropped

    def finish(self, rid: str) -> RequestState | str | None:
        """The finished request's state, or a reason string: 'unknown' or 'duplicate'."""
        st = self._live.pop(rid, None)
        if st is None:
            return "duplicate" if rid in self._finished else "unknown"
        self._finished[rid] = None
        while len(self._finished) > 4 * self.max_requests:
            self._finished.popitem(last=False)
        return st

    def expire(self, now: float) -> int:
        """Drop requests idle past the timeout (least recently updated first)."""
        n = 0
        while self._live:
            rid, st = next(iter(self._live.items()))
            if now - st.last_seen < self.timeout_s:
                break
            del self._live[rid]
            n += 1
        return n


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
    cat = (
        (lambda i, dt: np.concatenate([r[i] for r in requests]).astype(dt))
        if requests
        else (lambda i, dt: np.zeros((0, k) if i == 4 else 0, dt))
    )
    msg = pb.StepBatch(
        bundle_id=bundle_id,
        sender_id=sender_id,
        step=step,
        request_ids=[r[0] for r in requests],
        row_offsets=offsets,
        positions=cat(1, "<u4").tobytes(),
        token_ids=cat(2, "<u4").tobytes(),
        is_response=cat(3, np.int8).tobytes(),
        k=k,
        projections=np.ascontiguousarray(cat(4, "<f4")).tobytes(),
        finished=finished or [],
    )
    for reason, n in (rows_dropped or {}).items():
        msg.drops.rows_by_reason[reason] = n
    for reason, n in (steps_dropped or {}).items():
        msg.drops.steps_by_reason[reason] = n
    return msg
