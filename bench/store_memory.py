"""Memory of the request store filled to ``max_rows``, measured with tracemalloc.

    python bench/store_memory.py [--k 3] [--max-rows 4000000] [--max-requests 100000]

Fills a ``RequestStore`` with the sidecar's default bounds the ways that cost the most: many
requests of a few rows each (every request holds a partly filled page), one row each, and few
requests of many rows. Prints, per way, the memory tracemalloc saw held once full and at its peak
while filling, against the pool's bound (``RequestStore.memory_bound``), and, from a process of
its own without tracemalloc, how much the peak resident set grew.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.ingest import RequestStore
from wire.codec import Rows


def fill(k: int, max_rows: int, max_requests: int, rows_each: int, per_step: int) -> RequestStore:
    store = RequestStore(k, max_requests, 32_768, 600.0, max_rows=max_rows)
    n_req = min(max_requests, max_rows // rows_each)
    for first in range(0, n_req, per_step):
        ids = [f"r{i}" for i in range(first, min(first + per_step, n_req))]
        n = len(ids) * rows_each
        meta = np.zeros((n, 3), np.int64)
        meta[:, 0] = np.tile(np.arange(rows_each), len(ids))
        rows = Rows(ids, np.arange(len(ids) + 1) * rows_each, meta, np.zeros((n, k), np.float32))
        store.add(rows, 0.0)
    return store


def measure(k: int, max_rows: int, max_requests: int, rows_each: int, per_step: int) -> None:
    gc.collect()
    tracemalloc.start()
    store = fill(k, max_rows, max_requests, rows_each, per_step)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mb = 1e6
    print(
        f"{len(store):>7} requests x {rows_each:>6} rows = {store._rows:>9,} rows: "
        f"held {held / mb:6.1f} MB, peak {peak / mb:6.1f} MB, "
        f"bound {store.memory_bound / mb:6.1f} MB (pool {store.pool_rows:,} rows)"
    )


def peak_rss_kb() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, from the parent's peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_growth(k: int, max_rows: int, max_requests: int, rows_each: int, per_step: int) -> None:
    """Run in a process of its own: the peak RSS before and after filling."""
    before = peak_rss_kb()
    fill(k, max_rows, max_requests, rows_each, per_step)
    print(f"{'':>7} peak RSS grew {(peak_rss_kb() - before) / 1e3:6.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=4_000_000)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--rss-only", type=int, help=argparse.SUPPRESS)  # the child: one way
    a = ap.parse_args()
    ways = [(a.max_rows // a.max_requests, 2_000), (1, 2_000), (32_768, 4)]
    if a.rss_only is not None:
        rss_growth(a.k, a.max_rows, a.max_requests, *ways[a.rss_only])
        return
    for i, way in enumerate(ways):
        measure(a.k, a.max_rows, a.max_requests, *way)
        child = [sys.executable, __file__, "--rss-only", str(i), "--k", str(a.k)]
        child += ["--max-rows", str(a.max_rows), "--max-requests", str(a.max_requests)]
        subprocess.run(child, check=True)


if __name__ == "__main__":
    main()
