"""Engine-like traffic for the shipped bundle, and what to watch on the sidecar process under it.

Shared by the soak benchmark (`bench/soak.py`) and the fault tests (`tests/faults/`): one
generator of step batches that runs for as long as it is asked to, paced, with requests that start,
decode and finish at a steady rate, every ``flag_every``-th of them pushed over the first feature's
threshold so the flag queue has work.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detectors.bundle import Bundle
from detectors.roles import RESPONSE
from wire import monitor_pb2 as pb
from wire.codec import encode_step


@dataclass
class _Live:
    rid: str
    length: int  # rows in all (prompt then response)
    n_prompt: int
    sent: int = 0
    flagged: bool = False


@dataclass
class EngineLoad:
    """Step batches as an engine makes them: ``live`` running requests, each a prefill chunk of
    ``prefill`` rows then one decode row per step for about ``lifetime`` steps.

    Projections are ``-bias`` plus noise of 0.1, far below every threshold; a flagged request gets
    +10 on feature 0 over its whole response, far above. So which requests are flagged is known
    here, exactly, without asking the sidecar.
    """

    bundle: Bundle
    live: int = 64
    lifetime: int = 32
    prefill: int = 16
    flag_every: int = 10
    prefix: str = "r"
    seed: int = 0
    finished: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    rows_sent: int = 0
    steps_sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """Start no new requests; the generator ends once the running ones have finished."""
        self._stop.set()

    def steps(self, steps_per_s: float | None = None) -> Iterator[pb.StepBatch]:
        rng = np.random.default_rng(self.seed)
        k = self.bundle.k
        bias = self.bundle.bias.astype(np.float32)
        running: list[_Live] = []
        counter = 0
        pending: list[_Live] = []
        t0 = time.perf_counter()
        step = 0
        while running or pending or not self._stop.is_set():
            while not self._stop.is_set() and len(running) < self.live:
                life = int(rng.integers(self.lifetime // 2, self.lifetime * 3 // 2 + 1))
                r = _Live(f"{self.prefix}{counter}", self.prefill + life, self.prefill)
                r.flagged = self.flag_every > 0 and counter % self.flag_every == 0
                counter += 1
                running.append(r)
            rows = []
            for r in running:
                m = r.n_prompt if r.sent == 0 else 1
                pos = np.arange(r.sent, r.sent + m)
                proj = rng.normal(scale=0.1, size=(m, k)).astype(np.float32) - bias
                roles = (pos >= r.n_prompt).astype(np.int8)
                if r.flagged:
                    proj[roles == RESPONSE, 0] += 10.0
                tok = rng.integers(100, 2000, m)
                rows.append((r.rid, pos, tok, roles, proj))
                r.sent += m
            finished = [
                pb.FinishedRequest(
                    request_id=r.rid,
                    client_request_id=f"client-{r.rid}",
                    model="soak",
                    model_version="v1",
                    finish_reason="stop",
                )
                for r in pending
            ]
            for r in pending:
                self.finished.append(r.rid)
                if r.flagged:
                    self.flagged.append(r.rid)
            pending = [r for r in running if r.sent >= r.length]
            running = [r for r in running if r.sent < r.length]
            msg = encode_step(
                self.bundle.bundle_id, k, rows, step=step, sender_id="load", finished=finished
            )
            if steps_per_s:
                delay = t0 + step / steps_per_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            step += 1
            self.rows_sent += len(msg.is_response)
            self.steps_sent += 1
            yield msg


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page summed over its labels, by sample name; with its labels
    too, as ``name{label="value",...}`` keys, for the labeled series."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if s.labels:
                key = s.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[key + "}"] = s.value
    return out


def labeled(values: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s series whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for key, v in values.items() if key.startswith(name + "{") and all(w in key for w in want)
    )
