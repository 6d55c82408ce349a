"""Ingest load: stream engine-like step batches to a real sidecar process over a real socket.

    python bench/ingest.py [--requests 256] [--k 16] [--steps 4000] [--json]

The sidecar runs as `misalign-monitor serve` pinned to one core (taskset, when present), with its
own real Redis, and is fed over its Unix socket (as the tap feeds it); the load generator runs in
this process on the other core. Each step carries one decode row per running request; requests
live --lifetime steps, start with a --prefill-row chunk, and finish at a steady rate. Steps are
serialised before the clock starts, so the figure is the sidecar's, not protobuf encoding in the
generator.

The ceiling, measured in the same run: a bare grpc.aio server (this file, ``--bare-server``) on a
Unix socket, pinned to the same core, whose Ingest handler only decodes each message and counts
its rows, fed the same serialised steps by the same client. It runs once before the sidecar and
once after; ``ratio`` is the sidecar's rows/s over the mean of the two.

Two phases. Throughput: steps sent as fast as the sidecar takes them, nothing else talking to it.
Latency: steps paced at --paced-rate rows/s while a probe thread measures, for a sample of
requests, the time from sending the step that finishes them to GetRequestScore answering. The
probe polls (every 0.2 ms until the score is there), so it is kept out of the throughput phase:
under saturation its thousands of calls a second would be load of the bench's own making (it
took 40% off the measured rate), which no client of a real sidecar sends.

Printed against the goals (500,000 rows/s, 5,000 finished requests/s on one core; issue 20: a
third of the bare transport's rows/s, p99 under 10 ms at 30,000 rows/s) and against what one
H100 serving a model produces (about 30,000 tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.synthetic import synthetic_bundle  # noqa: E402
from detectors import bundle as bundle_io  # noqa: E402
from detectors.bundle import ModelRef  # noqa: E402
from service.embedded_redis import EmbeddedRedis  # noqa: E402
from service.processes import stop_process  # noqa: E402
from service.sidecar_process import start_sidecar  # noqa: E402
from wire import monitor_pb2 as pb  # noqa: E402
from wire import monitor_pb2_grpc as pb_grpc  # noqa: E402
from wire.codec import encode_step  # noqa: E402

GOAL = {"rows_per_s": 500_000, "requests_per_s": 5_000, "p99_ms": 10.0, "ratio": 1 / 3}
H100_TOKENS_PER_S = 30_000


def bench_bundle(path: Path, k: int) -> bundle_io.Bundle:
    return synthetic_bundle(
        path, ModelRef(name="bench-model", hidden_size=576, num_layers=30), 15, k, 2.5
    )


def schedule(
    b: bundle_io.Bundle, n_live: int, lifetime: int, prefill: int, steps: int, prefix: str = "r"
):  # type: ignore[no-untyped-def]
    """Serialised steps, rows and finishes per step, and which request each step finishes."""
    rng = np.random.default_rng(1)
    k = b.k
    next_id = 0
    live: dict[str, int] = {}  # id -> rows sent
    ends: dict[str, int] = {}

    def new() -> str:
        nonlocal next_id
        rid = f"{prefix}{next_id}"
        next_id += 1
        live[rid] = 0
        ends[rid] = lifetime + int(rng.integers(-lifetime // 2, lifetime // 2 + 1))
        return rid

    for _ in range(n_live):
        rid = new()
        live[rid] = prefill  # already past its prefill when the run starts
    out = []
    pending: list[str] = []
    for step in range(steps):
        rows = []
        done = []
        for rid in list(live):
            sent = live[rid]
            m = prefill if sent == 0 else 1
            proj = rng.normal(size=(m, k)).astype(np.float32)
            roles = np.full(m, 0 if sent == 0 else 1, np.int8)
            pos = np.arange(sent, sent + m)
            rows.append((rid, pos, rng.integers(0, 49152, m), roles, proj))
            live[rid] = sent + m
            if live[rid] - prefill >= ends[rid]:
                done.append(rid)
        fin = [
            pb.FinishedRequest(
                request_id=r, model="bench-model", model_version="v1", finish_reason="stop"
            )
            for r in pending
        ]
        msg = encode_step(b.bundle_id, k, rows, step=step, sender_id="bench", finished=fin)
        out.append((msg.SerializeToString(), sum(len(r[1]) for r in rows), pending))
        for rid in done:
            del live[rid]
            new()
        pending = done
    return out


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_phase(
    ingest, probe_stub, pid: int, steps, rate: float | None, probe_every: int | None
) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Stream ``steps`` (as fast as possible, or paced at ``rate`` rows/s) and measure; with
    ``probe_every``, the finish-to-score latency of one request in that many steps."""
    probes: list[tuple[str, float]] = []
    latencies: list[float] = []
    lock = threading.Condition()
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set() or probes:
            with lock:
                if not probes:
                    lock.wait(0.05)
                    continue
                rid, sent = probes.pop(0)
            while True:
                try:
                    probe_stub.GetRequestScore(pb.GetRequestScoreRequest(request_id=rid), timeout=5)
                    latencies.append(time.perf_counter() - sent)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND or time.perf_counter() - sent > 5:
                        break
                    time.sleep(0.0002)

    th = threading.Thread(target=prober, daemon=True)
    if probe_every:
        th.start()
    start = time.perf_counter()

    def gen():  # type: ignore[no-untyped-def]
        sent_rows = 0
        for i, (data, n_rows, finished) in enumerate(steps):
            if rate:
                delay = start + sent_rows / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if probe_every and finished and i % probe_every == 0:
                with lock:
                    probes.append((finished[0], time.perf_counter()))
                    lock.notify()
            sent_rows += n_rows
            yield data

    cpu0 = proc_cpu_seconds(pid)
    summary = ingest(gen(), timeout=600)
    elapsed = time.perf_counter() - start
    cpu = proc_cpu_seconds(pid) - cpu0
    stop.set()
    if probe_every:
        th.join(10)
    rows = sum(x[1] for x in steps)
    out = {
        "rows_per_s": rows / elapsed,
        "requests_per_s": summary.finished / elapsed,
        "cpu_s_per_million_rows": cpu / rows * 1e6,
        "rows": rows,
        "finished": summary.finished,
        "elapsed_s": elapsed,
    }
    if probe_every:
        if not latencies:
            raise SystemExit(
                "no probe got a score: the sidecar scored none of the sampled requests"
            )
        lat = np.array(latencies) * 1e3
        out |= {
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "latency_samples": len(latencies),
        }
    return out


async def _bare_server(path: str) -> None:
    """The transport's ceiling: receive and decode each StepBatch, count its rows, nothing else."""

    async def ingest(it, context):  # type: ignore[no-untyped-def]
        steps = rows = 0
        async for msg in it:
            steps += 1
            rows += len(msg.is_response)
        return pb.IngestSummary(steps=steps, rows=rows)

    handler = grpc.method_handlers_generic_handler(
        "misalign.v1.Monitor",
        {
            "Ingest": grpc.stream_unary_rpc_method_handler(
                ingest, pb.StepBatch.FromString, pb.IngestSummary.SerializeToString
            )
        },
    )
    limit = 2 * 64 * 1024 * 1024  # as the sidecar's receive limit (twice max_message_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    Path(path + ".ready").write_text("1")
    await server.wait_for_termination()


def bare_phase(work: Path, pin: list[int] | None, steps) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Stream ``steps`` at full rate into a bare server process pinned like the sidecar."""
    sock = str(work / f"bare-{time.monotonic_ns()}.sock")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-server", sock]
    proc = subprocess.Popen(["taskset", "-c", ",".join(map(str, pin)), *cmd] if pin else cmd)
    try:
        deadline = time.monotonic() + 60
        while not Path(sock + ".ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the bare server did not start")
            time.sleep(0.02)
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            ingest = channel.stream_unary(
                "/misalign.v1.Monitor/Ingest",
                request_serializer=None,
                response_deserializer=pb.IngestSummary.FromString,
            )
            cpu0 = proc_cpu_seconds(proc.pid)
            start = time.perf_counter()
            summary = ingest(iter([x[0] for x in steps]), timeout=600)
            elapsed = time.perf_counter() - start
            cpu = proc_cpu_seconds(proc.pid) - cpu0
    finally:
        stop_process(proc, 10)
    rows = sum(x[1] for x in steps)
    if summary.rows != rows:
        raise SystemExit(f"the bare server counted {summary.rows} rows of {rows}")
    return {
        "rows_per_s": rows / elapsed,
        "cpu_s_per_million_rows": cpu / rows * 1e6,
        "elapsed_s": elapsed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=256, help="running requests")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--lifetime", type=int, default=48, help="decode steps per request (mean)")
    ap.add_argument("--prefill", type=int, default=64, help="prompt rows per request, one chunk")
    ap.add_argument("--steps", type=int, default=4000, help="steps in the throughput phase")
    ap.add_argument(
        "--paced-rate", type=float, default=30_000, help="rows/s offered in the latency phase"
    )
    ap.add_argument("--paced-steps", type=int, default=600)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--bare-server", metavar="SOCKET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        asyncio.run(_bare_server(args.bare_server))
        return 0

    work = Path(tempfile.mkdtemp(prefix="misalign-bench-"))
    b = bench_bundle(work / "bundle.safetensors", args.k)
    steps = schedule(b, args.requests, args.lifetime, args.prefill, args.steps)
    paced_steps = schedule(
        b, args.requests, args.lifetime, args.prefill, args.paced_steps, prefix="p"
    )

    redis = EmbeddedRedis(work / "redis")  # a real redis-server of the bench's own
    redis_url = redis.start()
    pin = [0] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else None
    if pin:
        os.sched_setaffinity(0, {1})
    sock = work / "sidecar.sock"
    try:
        bare_before = bare_phase(work, pin, steps)
        sidecar = start_sidecar(
            work,
            "--bundle",
            str(b.path),
            "--redis-url",
            redis_url,
            "--unix-socket",
            str(sock),
            cpus=pin,
        )
    except BaseException:
        redis.stop()
        raise
    try:
        channel = grpc.insecure_channel(f"unix:{sock}")
        ingest = channel.stream_unary(
            "/misalign.v1.Monitor/Ingest",
            request_serializer=None,
            response_deserializer=pb.IngestSummary.FromString,
        )
        probe_stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"unix:{sock}"))
        full = run_phase(ingest, probe_stub, sidecar.pid, steps, rate=None, probe_every=None)
        paced = run_phase(
            ingest, probe_stub, sidecar.pid, paced_steps, rate=args.paced_rate, probe_every=2
        )
        rss = proc_rss_mb(sidecar.pid)
    finally:
        sidecar.stop(30)
        redis.stop()
    try:
        bare_after = bare_phase(work, pin, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare_rows = (bare_before["rows_per_s"] + bare_after["rows_per_s"]) / 2
    # what the ceiling's rate would finish: the same steps carry the same finishes
    bare_requests = bare_rows * full["finished"] / full["rows"]

    result = {
        "k": args.k,
        "rows_per_s": full["rows_per_s"],
        "requests_per_s": full["requests_per_s"],
        "bare_rows_per_s": bare_rows,
        "bare_requests_per_s": bare_requests,
        "ratio": full["rows_per_s"] / bare_rows,
        "p50_ms": paced["p50_ms"],
        "p99_ms": paced["p99_ms"],
        "rss_mb": rss,
        "cpu_s_per_million_rows": full["cpu_s_per_million_rows"],
        "pinned_to_one_core": bool(pin),
        "throughput_phase": full,
        "latency_phase": paced,
        "bare_phases": [bare_before, bare_after],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    g = GOAL
    print(
        f"sidecar on {'one core (taskset -c 0)' if pin else 'unpinned'}, fed over its Unix socket; "
        f"{args.requests} running "
        f"requests, k = {args.k}, prefill chunks of {args.prefill}, ~{args.lifetime} decode steps each"
    )
    print(
        f"throughput phase: {full['rows']:,} rows sent as fast as the sidecar takes them "
        f"({full['elapsed_s']:.2f} s); latency phase: paced at {args.paced_rate:,.0f} rows/s "
        f"({paced['latency_samples']} probes)\n"
    )
    print("| measure | measured | goal | measured / goal |")
    print("|---|---|---|---|")
    print(
        f"| token rows / s (saturated) | {full['rows_per_s']:,.0f} | {g['rows_per_s']:,} | {full['rows_per_s'] / g['rows_per_s']:.2f} |"
    )
    print(
        f"| finished requests / s (saturated) | {full['requests_per_s']:,.0f} | {g['requests_per_s']:,} | {full['requests_per_s'] / g['requests_per_s']:.2f} |"
    )
    print(
        f"| bare transport rows / s (same core, same client; before, after) | {bare_rows:,.0f} "
        f"({bare_before['rows_per_s']:,.0f}, {bare_after['rows_per_s']:,.0f}) | | |"
    )
    print(
        f"| sidecar / bare transport (rows / s) | {result['ratio']:.3f} | >= {g['ratio']:.3f} | "
        f"{result['ratio'] / g['ratio']:.2f} |"
    )
    print(f"| p50 finish -> score, paced (ms) | {paced['p50_ms']:.2f} | | |")
    print(
        f"| p99 finish -> score, paced (ms) | {paced['p99_ms']:.2f} | < {g['p99_ms']:.0f} | {paced['p99_ms'] / g['p99_ms']:.2f} |"
    )
    print(f"| sidecar RSS after both phases (MB) | {rss:.0f} | | |")
    print(f"| sidecar CPU s per million rows | {full['cpu_s_per_million_rows']:.2f} | | |")
    print(
        f"\nheadroom over one H100's ~{H100_TOKENS_PER_S:,} tokens/s: {full['rows_per_s'] / H100_TOKENS_PER_S:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
