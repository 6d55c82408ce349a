"""The bounded per-request state that decoded step batches fill.

Batches are decoded and checked whole by ``wire.codec`` before any of them is applied here, so a
malformed batch changes nothing.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from wire.codec import Rows


@dataclass(frozen=True)
class Gathered:
    """The rows of requests finished together, request i holding rows ``offsets[i]:offsets[i+1]``,
    each request's rows in position order."""

    request_ids: list[str]
    offsets: np.ndarray  # [r + 1]
    token_ids: np.ndarray  # [n] int64
    roles: np.ndarray  # [n] int8
    projections: np.ndarray  # [n, k] float32


class RequestStore:
    """Per-request rows in a paged pool, bounded in count, length and age.

    Each step's rows are scattered into fixed-size pages with a few numpy operations for the
    whole step, whatever the number of requests in it: a request holds a chain of pages
    (``_next``), and only a step that brings a new request runs Python code for it. A request's
    rows are gathered from its chain when it finishes and its pages go back to the free list.
    """

    def __init__(
        self,
        k: int,
        max_requests: int,
        max_tokens: int,
        timeout_s: float,
        page_rows: int = 16,
        max_rows: int | None = None,
    ) -> None:
        self.k = k
        self.max_requests = max_requests
        # Rows held at once across requests: the memory bound (max_requests x max_tokens is far
        # above what a server can hold).
        self.max_rows = max_rows if max_rows is not None else max_requests * max_tokens
        self._rows = 0
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.page = page_rows
        self._slot: dict[str, int] = {}  # live request id -> slot
        self._ids: list[str | None] = []  # slot -> request id
        self._free_slots: list[int] = []
        # per slot
        self._count = np.zeros(0, np.int64)
        self._head = np.zeros(0, np.int64)
        self._tail = np.zeros(0, np.int64)
        self._seen = np.zeros(0, np.float64)
        # the pool, by page; row r of page p is pool row p * page + r
        self._next = np.zeros(0, np.int64)  # next page of the same request, -1 at the end
        self._free = np.zeros(0, np.int64)  # free page ids, a stack of _nfree
        self._nfree = 0
        self._meta = np.zeros((0, 3), np.int64)  # position, token id, role
        self._proj = np.zeros((0, k), np.float32)
        self._views()
        self._finished: OrderedDict[str, None] = OrderedDict()  # recent ids, to spot duplicates

    def _views(self) -> None:
        """The pool's rows as one opaque item each: a row copied by index is one memcpy, not a
        loop over its columns (a fraction of the time for rows this narrow). Made again
        whenever the pool is resized."""
        self._meta_rows = _as_rows(self._meta)
        self._proj_rows = _as_rows(self._proj)

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def max_pages(self) -> int:
        """Pages the pool needs at most: ``max_rows`` rows in whole pages, and one partly filled
        page more per request (a request of 17 rows holds two pages of 16)."""
        return -(-self.max_rows // self.page) + self.max_requests

    @property
    def memory_bound(self) -> int:
        """Bytes of the pool at ``max_pages``: each page ``page_rows`` rows of 24 + 4 k bytes
        (position, token id, role as int64, k float32 projections), and 16 bytes of chaining."""
        return self.max_pages * (self.page * (24 + 4 * self.k) + 16)

    @property
    def pool_rows(self) -> int:
        """Rows the pool holds room for (grows to the peak of live rows, in whole pages)."""
        return len(self._meta)

    def _new_slot(self, rid: str, now: float) -> int:
        if not self._free_slots:
            n = len(self._ids)
            grow = max(n, 64)
            self._ids.extend([None] * grow)
            self._free_slots = list(range(n + grow - 1, n - 1, -1))
            self._count = np.r_[self._count, np.zeros(grow, np.int64)]
            self._head = np.r_[self._head, np.full(grow, -1, np.int64)]
            self._tail = np.r_[self._tail, np.full(grow, -1, np.int64)]
            self._seen = np.r_[self._seen, np.zeros(grow)]
        slot = self._free_slots.pop()
        self._ids[slot] = rid
        self._slot[rid] = slot
        self._seen[slot] = now
        return slot

    def _take_pages(self, n: int) -> np.ndarray:
        if n > self._nfree:
            have = len(self._next)
            # Doubling, but not past what max_rows and max_requests can fill (finished requests
            # waiting to be scored may still take a few pages more).
            grow = max(n - self._nfree, min(max(have, 64), self.max_pages - have))
            rows = (have + grow) * self.page
            # In place (realloc: a large block grows by remapping its pages, not by copying
            # them into a second one): nothing else holds a view of the pool.
            self._next.resize(have + grow, refcheck=False)
            self._next[have:] = -1
            self._meta.resize((rows, 3), refcheck=False)
            self._proj.resize((rows, self.k), refcheck=False)
            self._free.resize(have + grow, refcheck=False)
            self._views()
            self._free[self._nfree : self._nfree + grow] = np.arange(have + grow - 1, have - 1, -1)
            self._nfree += grow
        self._nfree -= n
        return self._free[self._nfree : self._nfree + n].copy()

    def _pages(self, slot: int) -> list[int]:
        pages = []
        p = int(self._head[slot])
        nxt = self._next
        while p >= 0:
            pages.append(p)
            p = int(nxt[p])
        return pages

    def _release(self, slots: list[int], freed: np.ndarray) -> None:
        for slot in slots:
            rid = self._ids[slot] or ""
            if self._slot.get(rid) == slot:  # still live: expired, not finished
                del self._slot[rid]
            self._ids[slot] = None
            self._free_slots.append(slot)
        idx = np.asarray(slots, np.int64)
        self._rows -= int(self._count[idx].sum())
        self._count[idx] = 0
        self._head[idx] = self._tail[idx] = -1
        self._next[freed] = -1
        self._free[self._nfree : self._nfree + len(freed)] = freed
        self._nfree += len(freed)

    def add(self, rows: Rows, now: float) -> dict[str, int]:
        """Append a batch's rows; returns rows dropped by reason (capacity, length, late)."""
        dropped: dict[str, int] = {}
        ids = rows.request_ids
        off = rows.offsets
        lens = off[1:] - off[:-1]
        slots = np.fromiter(map(self._slot.get, ids, itertools.repeat(-1)), np.int64, len(ids))
        absent = slots < 0
        # (np.count_nonzero: a fraction of ndarray.any's cost on arrays this small)
        if np.count_nonzero(absent):
            new: list[int] = []  # slots made for this batch: given back if their rows are refused
            for i in np.flatnonzero(absent & (lens > 0)).tolist():
                rid, m = ids[i], int(lens[i])
                if rid in self._finished:
                    dropped["after_finish"] = dropped.get("after_finish", 0) + m
                elif len(self._slot) >= self.max_requests:
                    dropped["capacity"] = dropped.get("capacity", 0) + m
                elif m > self.max_tokens:
                    dropped["too_long"] = dropped.get("too_long", 0) + m
                else:
                    slots[i] = self._new_slot(rid, now)
                    new.append(i)
            keep = (slots >= 0) & (lens > 0)
        else:
            new = []
            keep = lens > 0
        n_keep = np.count_nonzero(keep)
        if not n_keep:  # also: no slot exists yet to index below
            return dropped
        every = n_keep == len(keep)
        c0 = self._count[slots if every else np.where(keep, slots, 0)]
        too_long = c0 + lens > self.max_tokens
        if not every:
            too_long &= keep
        if np.count_nonzero(too_long):
            dropped["too_long"] = dropped.get("too_long", 0) + int(lens[too_long].sum())
            keep &= ~too_long
            every = False
        kept_lens = lens if every else np.where(keep, lens, 0)
        if int(kept_lens.sum()) > self.max_rows - self._rows:  # else none is over
            over = keep & (np.cumsum(kept_lens) > self.max_rows - self._rows)
            dropped["capacity"] = dropped.get("capacity", 0) + int(lens[over].sum())
            keep &= ~over
            every = False
            refused = [int(slots[i]) for i in new if over[i]]
            if refused:  # a request none of whose rows were kept holds nothing
                self._release(refused, np.zeros(0, np.int64))
        if not every and not np.count_nonzero(keep):
            return dropped
        if every:
            sl, ln, src0 = slots, lens, off[:-1]
        else:
            sl, ln, c0, src0 = slots[keep], lens[keep], c0[keep], off[:-1][keep]
        self._scatter(rows, sl, ln, c0, src0)
        self._seen[sl] = now
        return dropped

    def _scatter(
        self, rows: Rows, sl: np.ndarray, ln: np.ndarray, c0: np.ndarray, src0: np.ndarray
    ) -> None:
        """Write segment i of ``rows`` (``ln[i]`` rows from ``src0[i]``) after the ``c0[i]`` rows
        slot ``sl[i]`` holds: first into the free end of its last page, then into new pages."""
        P = self.page
        room = -c0 % P  # free rows in the last page (0 when there is none)
        # new pages per segment: ceil((ln - room) / P), 0 when the rows fit (ln - room > -P)
        extra = (ln - room + (P - 1)) // P
        ends = np.cumsum(extra)
        total = int(ends[-1])
        first_new = ends - extra  # segment i's new pages: new[first_new[i]:...]
        old_tail = self._tail[sl]
        if total:
            new = self._take_pages(total)
            has = extra > 0
            # Chain the new pages of each segment (taken pages are unchained: _next is -1),
            # then hang them after its last page.
            last_new = (ends - 1)[has]
            nxt = self._next
            nxt[new[:-1]] = new[1:]
            nxt[new[last_new]] = -1
            hs, fn = sl[has], new[first_new[has]]
            tail = old_tail[has]
            cont = tail >= 0
            nxt[tail[cont]] = fn[cont]
            self._head[hs[~cont]] = fn[~cont]
            self._tail[hs] = new[last_new]
        n = int(ln.sum())
        starts = np.cumsum(ln) - ln
        seg = np.repeat(np.arange(len(ln)), ln)  # each row's segment
        # q: the row's index past the free end of its segment's last page; < 0: into that page
        q = np.arange(n) - (starts + room)[seg]
        if total:
            # q // P is -1 in the old page (an index np.where discards)
            page = np.where(q < 0, old_tail[seg], new[first_new[seg] + q // P])
        else:
            page = old_tail[seg]
        dst = page * P + q % P
        if n == len(rows.meta):
            self._meta_rows[dst] = _as_rows(rows.meta)
            self._proj_rows[dst] = _as_rows(rows.projections)
        else:
            src = np.repeat(src0 - starts, ln) + np.arange(n)
            self._meta_rows[dst] = _as_rows(rows.meta)[src]
            self._proj_rows[dst] = _as_rows(rows.projections)[src]
        self._count[sl] = c0 + ln
        self._rows += n

    def finish(self, rids: list[str]) -> tuple[list[int], list[str | None]]:
        """Close requests: from now on their rows are refused (``after_finish``) and they never
        expire; their rows stay where they are until ``gather``.

        Returns the slots of those that were live, and per id None when closed, else the
        reason it was not: 'unknown' or 'duplicate'."""
        slots: list[int] = []
        reasons: list[str | None] = []
        for rid in rids:
            slot = self._slot.pop(rid, None)
            if slot is None:
                reasons.append("duplicate" if rid in self._finished else "unknown")
                continue
            reasons.append(None)
            slots.append(slot)
            self._finished[rid] = None
        self._seen[slots] = np.inf
        while len(self._finished) > 4 * self.max_requests:
            self._finished.popitem(last=False)
        return slots, reasons

    def gather(self, slots: list[int]) -> Gathered:
        """The rows of closed requests, each by position; frees their pages and slots."""
        P = self.page
        rids = [self._ids[s] or "" for s in slots]
        chains = [self._pages(s) for s in slots]
        pages = np.fromiter(itertools.chain.from_iterable(chains), np.int64)
        counts = self._count[slots]
        off = np.zeros(len(slots) + 1, np.int64)
        counts.cumsum(out=off[1:])
        # rows filled in each page: P, except in a request's last page
        npages = np.fromiter(map(len, chains), np.int64, len(chains))
        rank = np.arange(len(pages)) - (npages.cumsum() - npages).repeat(npages)
        filled = np.minimum(counts.repeat(npages) - rank * P, P)
        idx = (pages[:, None] * P + np.arange(P))[np.arange(P) < filled[:, None]]
        meta = self._meta_rows[idx].view(np.int64).reshape(-1, 3)
        proj = self._proj_rows[idx].view(np.float32).reshape(-1, self.k)
        self._release(slots, pages)
        pos = meta[:, 0]
        d = np.diff(pos)
        d[off[1:-1] - 1] = 1  # a request boundary is not a repeat
        if len(d) and (d <= 0).any():
            meta, proj, off = _last_write_wins(meta, proj, off)
        return Gathered(rids, off, meta[:, 1], meta[:, 2].astype(np.int8), proj)

    def expire(self, now: float) -> int:
        """Drop requests idle past the timeout (closed ones wait for ``gather``, never here).

        Every live request, with pages or without: a slot that holds no row still counts
        against ``max_requests``."""
        live = np.fromiter(self._slot.values(), np.int64, len(self._slot))
        stale = live[now - self._seen[live] >= self.timeout_s].tolist()
        if stale:
            pages = itertools.chain.from_iterable(self._pages(s) for s in stale)
            self._release(stale, np.fromiter(pages, np.int64))
        return len(stale)


def _as_rows(a: np.ndarray) -> np.ndarray:
    """A C-contiguous 2-d array as a 1-d array of its rows, each one opaque item (a view)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(len(a))


def _last_write_wins(
    meta: np.ndarray, proj: np.ndarray, off: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request, rows by position; a position seen twice (recomputed after preemption) keeps
    its last write."""
    parts, new_off = [], [0]
    for s, e in zip(off[:-1].tolist(), off[1:].tolist(), strict=True):
        pos = meta[s:e, 0]
        if e - s > 1 and (np.diff(pos) <= 0).any():
            # the last occurrence of each position: unique on the reversed rows
            _, first_in_rev = np.unique(pos[::-1], return_index=True)
            parts.append(s + (e - s - 1 - first_in_rev))
        else:
            parts.append(np.arange(s, e))
        new_off.append(new_off[-1] + len(parts[-1]))
    idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return meta[idx], proj[idx], np.asarray(new_off, np.int64)
