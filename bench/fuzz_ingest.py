"""Coverage-guided fuzzing (atheris) of the sidecar's ingest path: bytes off the wire, decoded as a
StepBatch, applied to a Monitor holding the shipped bundle.

    python bench/fuzz_ingest.py [--runs 100000] [--seed 0]

Every input must either fail protobuf decoding (`DecodeError`), be refused with `BadInput` (what
the server turns into INVALID_ARGUMENT), or apply; any other exception is a finding: atheris
prints the input and the traceback and the command exits non-zero. The corpus starts from a few
valid batches, so mutations stay near what a tap sends. Prints how many inputs were tried.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

# Libraries first, uninstrumented: coverage feedback should come from our code alone (and
# instrumenting grpc, redis or prometheus_client makes start-up take minutes).
import grpc  # noqa: E402, F401
import numpy as np  # noqa: E402
import prometheus_client  # noqa: E402, F401
import redis  # noqa: E402, F401
from google.protobuf.message import DecodeError  # noqa: E402

from detectors import bundle as bundle_io  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from wire import monitor_pb2 as pb  # noqa: E402

with atheris.instrument_imports():
    from detectors import scoring  # noqa: F401
    from detectors.errors import BadInput
    from service import flags, ingest, monitor  # noqa: F401
    from wire import codec

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
RUNS = 0  # set by main; the last input prints the summary (libFuzzer exits without atexit)
T0 = time.monotonic()
STATS = {"tried": 0, "decoded": 0, "refused": 0, "applied": 0, "escaped": 0}
# One long-lived monitor, as in the server: state left by one input is the next one's context.
MONITOR = monitor.Monitor(BUNDLE, Metrics(BUNDLE), None, max_requests=256, max_tokens=512)


def summary() -> str:
    return (
        f"fuzz_ingest: {STATS['tried']:,} inputs in {time.monotonic() - T0:.1f} s: "
        f"{STATS['tried'] - STATS['decoded']:,} not protobuf, {STATS['refused']:,} refused "
        f"with BadInput, {STATS['applied']:,} applied; "
        + ("no unhandled exception" if not STATS["escaped"] else "AN EXCEPTION ESCAPED")
    )


def one_input(data: bytes) -> None:
    STATS["tried"] += 1
    try:
        apply(data)
    except Exception:
        STATS["escaped"] += 1
        print(summary(), flush=True)
        raise
    if STATS["tried"] == RUNS:
        print(summary(), flush=True)


def apply(data: bytes) -> None:
    try:
        msg = pb.StepBatch.FromString(data)
    except DecodeError:
        return
    STATS["decoded"] += 1
    try:
        MONITOR.ingest(msg)
    except BadInput:
        STATS["refused"] += 1
        return
    STATS["applied"] += 1
    if STATS["applied"] % 1000 == 0:
        MONITOR.expire()


def seed_corpus(d: Path) -> None:
    rng = np.random.default_rng(0)
    k = BUNDLE.k
    for i in range(8):
        reqs = []
        for j in range(int(rng.integers(1, 4))):
            m = int(rng.integers(1, 6))
            reqs.append(
                (
                    f"r{i}-{j}",
                    np.arange(m),
                    rng.integers(0, 50_000, m),
                    (np.arange(m) > 1).astype(np.int8),
                    rng.normal(size=(m, k)).astype(np.float32),
                )
            )
        fin = [pb.FinishedRequest(request_id=f"r{i}-0", model="m")] if i % 2 else []
        msg = codec.encode_step(BUNDLE.bundle_id, k, reqs, step=i, finished=fin)
        (d / f"seed{i}").write_bytes(msg.SerializeToString())


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=100_000, help="inputs to try")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer seed (0: random)")
    args = ap.parse_args()
    corpus = Path(tempfile.mkdtemp(prefix="misalign-fuzz-"))
    seed_corpus(corpus)
    global RUNS, T0
    RUNS, T0 = args.runs, time.monotonic()
    atheris.Setup(
        [sys.argv[0], f"-runs={args.runs}", f"-seed={args.seed}", "-max_len=4096", str(corpus)],
        one_input,
    )
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
