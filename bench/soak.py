"""Soak: a real sidecar process under steady engine-like traffic for a long time, watched.

    python bench/soak.py [--minutes 30] [--steps-per-s 25] [--live 64] [--csv soak.csv] [--json]

The sidecar runs as `misalign-monitor serve` with a real redis-server of its own; a client streams
steps paced at --steps-per-s (one decode row per running request per step, a 16-row prefill chunk
each, about 32 decode steps each, every 10th request flagged and queued to Redis), opening a new
Ingest stream every --stream-s seconds. Every --sample-s seconds it records the sidecar's RSS,
open file descriptors and error counters; the curve goes to --csv, the verdict to stdout.

Flat means: after the warm-up (the first fifth of the run, while the bounded structures fill —
the recent-score table and the finished-id set, sized by --recent-scores and --max-requests), RSS
grows by less than --rss-slack-mb between the second quarter and the last quarter of the run, the
fd count moves by at most 2, and no error counter moves at all.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.steady_load import EngineLoad, open_fds, rss_mb, scrape  # noqa: E402
from detectors import bundle as bundle_io  # noqa: E402
from service.embedded_redis import EmbeddedRedis  # noqa: E402
from service.sidecar_process import start_sidecar  # noqa: E402
from wire import monitor_pb2_grpc as pb_grpc  # noqa: E402

# Counters that must not move once the service is warm: anything here rising is an error growing.
ERROR_COUNTERS = (
    "misalign_ingest_errors_total",
    "misalign_queue_push_failures_total",
    "misalign_queue_dropped_total",
    "misalign_rows_dropped_total",
    "misalign_requests_expired_total",
)


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    rows_ingested: int
    scored: float
    active: float
    buffered: float
    errors: float  # the sum of ERROR_COUNTERS


@dataclass
class Verdict:
    minutes: float
    rows_sent: int
    requests_scored: int
    flagged_sent: int
    flagged_in_stream: int
    rss_start_mb: float
    rss_warm_mb: float  # mean over the second quarter
    rss_end_mb: float  # mean over the last quarter
    rss_max_mb: float
    rss_growth_mb: float
    fds_warm_min: int
    fds_warm_max: int
    errors_after_warmup: float
    stream_errors: int
    flat: bool


def _stream_forever(
    address: str,
    bundle: bundle_io.Bundle,
    args: argparse.Namespace,
    stop: threading.Event,
    totals: dict[str, int],
    problems: list[str],
) -> None:
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.MonitorStub(channel)
    i = 0
    while not stop.is_set():
        load = EngineLoad(bundle, live=args.live, prefix=f"s{i}-", seed=i)
        timer = threading.Timer(args.stream_s, load.stop)
        timer.start()
        watcher = threading.Thread(target=lambda ld=load: (stop.wait(), ld.stop()), daemon=True)
        watcher.start()
        try:
            stub.Ingest(load.steps(args.steps_per_s), timeout=args.stream_s + 120)
        except grpc.RpcError as exc:
            problems.append(f"stream {i}: {exc.code().name}: {exc.details()}")
        timer.cancel()
        totals["rows"] += load.rows_sent
        totals["flagged"] += len(load.flagged)
        i += 1
    channel.close()


def run_soak(args: argparse.Namespace, work: Path) -> tuple[list[Sample], Verdict]:
    bundle = bundle_io.load(bundle_io.default_bundle_path())
    redis = EmbeddedRedis(work / "redis-state")
    try:
        return _soak(args, work, bundle, redis.start(), redis)
    finally:
        redis.stop()


def _soak(
    args: argparse.Namespace,
    work: Path,
    bundle: bundle_io.Bundle,
    url: str,
    redis: EmbeddedRedis,
) -> tuple[list[Sample], Verdict]:
    env = {
        "MISALIGN_MAX_REQUESTS": str(args.max_requests),
        "MISALIGN_RECENT_SCORES": str(args.recent_scores),
    }
    samples: list[Sample] = []
    problems: list[str] = []
    totals = {"rows": 0, "flagged": 0}
    stop = threading.Event()
    with start_sidecar(work / "sidecar", "--redis-url", url, env=env) as sc:
        feeder = threading.Thread(
            target=_stream_forever,
            args=(sc.address, bundle, args, stop, totals, problems),
            daemon=True,
        )
        t0 = time.monotonic()
        feeder.start()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            m = scrape(sc.metrics_url)
            samples.append(
                Sample(
                    t_s=round(time.monotonic() - t0, 1),
                    rss_mb=round(rss_mb(sc.pid), 2),
                    fds=open_fds(sc.pid),
                    rows_ingested=int(m.get("misalign_tokens_ingested_total", 0)),
                    scored=m.get("misalign_requests_scored_total", 0.0),
                    active=m.get("misalign_active_requests", 0.0),
                    buffered=m.get("misalign_queue_buffered", 0.0),
                    errors=sum(m.get(name, 0.0) for name in ERROR_COUNTERS),
                )
            )
            time.sleep(max(0.0, min(args.sample_s, end - time.monotonic())))
        stop.set()
        feeder.join(args.stream_s + 180)
        settle = time.monotonic() + 30  # the last flagged samples on their way to Redis
        while time.monotonic() < settle and scrape(sc.metrics_url).get("misalign_queue_buffered"):
            time.sleep(0.1)
        import redis as redis_py

        client = redis_py.Redis(unix_socket_path=str(redis.socket))
        in_stream = int(client.xlen("misalign:{flagged}"))
        client.close()
    return samples, verdict(samples, args, totals, in_stream, len(problems))


def verdict(
    samples: list[Sample],
    args: argparse.Namespace,
    totals: dict[str, int],
    in_stream: int,
    stream_errors: int,
) -> Verdict:
    n = len(samples)
    if n < 8:
        raise SystemExit(f"only {n} samples: run longer or sample more often (--sample-s)")
    warm = samples[n // 5 :]
    q2 = samples[n // 4 : n // 2]
    q4 = samples[3 * n // 4 :]
    mean = lambda xs: sum(x.rss_mb for x in xs) / len(xs)  # noqa: E731
    growth = mean(q4) - mean(q2)
    fds = [s.fds for s in warm]
    errors = samples[-1].errors - warm[0].errors
    flat = growth < args.rss_slack_mb and max(fds) - min(fds) <= 2 and errors == 0
    return Verdict(
        minutes=round(samples[-1].t_s / 60, 2),
        rows_sent=totals["rows"],
        requests_scored=int(samples[-1].scored),
        flagged_sent=totals["flagged"],
        flagged_in_stream=in_stream,
        rss_start_mb=samples[0].rss_mb,
        rss_warm_mb=round(mean(q2), 2),
        rss_end_mb=round(mean(q4), 2),
        rss_max_mb=max(s.rss_mb for s in samples),
        rss_growth_mb=round(growth, 2),
        fds_warm_min=min(fds),
        fds_warm_max=max(fds),
        errors_after_warmup=errors,
        stream_errors=stream_errors,
        flat=flat and stream_errors == 0,
    )


def write_csv(samples: list[Sample], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(samples[0])))
        w.writeheader()
        for s in samples:
            w.writerow(asdict(s))


def write_png(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a.plot(t, [s.rss_mb for s in samples])
    a.set_ylabel("sidecar RSS (MB)")
    a.set_ylim(bottom=0)
    b.plot(t, [s.fds for s in samples], color="tab:orange")
    b.set_ylabel("open fds")
    b.set_ylim(bottom=0)
    b.set_xlabel("minutes")
    fig.suptitle("misalign-monitor soak: sidecar under steady load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--steps-per-s", type=float, default=25.0)
    ap.add_argument("--live", type=int, default=64, help="running requests")
    ap.add_argument("--stream-s", type=float, default=60.0, help="seconds per Ingest stream")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=1000, help="sidecar setting")
    ap.add_argument("--recent-scores", type=int, default=1000, help="sidecar setting")
    ap.add_argument("--rss-slack-mb", type=float, default=8.0)
    ap.add_argument("--csv", type=Path, default=Path("soak.csv"), help="the RSS/fd curve")
    ap.add_argument("--png", type=Path, help="also draw the curve (needs matplotlib)")
    ap.add_argument("--json", action="store_true")
    return ap


def main() -> int:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="misalign-soak-") as tmp:
        samples, v = run_soak(args, Path(tmp))
    write_csv(samples, args.csv)
    if args.png:
        write_png(samples, args.png)
    if args.json:
        print(json.dumps(asdict(v)))
    else:
        print(
            f"soak: {v.minutes} min, {args.steps_per_s:g} steps/s x {args.live} running "
            f"requests; curve in {args.csv}\n"
        )
        print(f"{'measure':<34}{'value':>14}")
        print("-" * 48)
        for key, value in asdict(v).items():
            print(f"{key:<34}{value!s:>14}")
    return 0 if v.flat else 1


if __name__ == "__main__":
    sys.exit(main())
