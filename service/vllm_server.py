"""Starting vLLM's OpenAI-compatible server with the tap, and talking to it (demo and tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from detectors.errors import MisalignError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a vLLM child, with ``overrides``. TQDM_DISABLE is left out:
    vLLM divides by tqdm's clock, which a disabled bar never starts."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env.update(overrides)
    return env


def start(
    model_dir: Path,
    port: int,
    log: IO[bytes],
    *,
    bundle: Path | None,
    sidecar: str,
    model_version: str = "demo",
    compiled: bool = False,
    tap_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    env_overrides: dict[str, str] | None = None,
    log_stats: bool = False,
) -> subprocess.Popen[bytes]:
    """The server, started; ``tap_env`` adds tap settings (e.g. ``MISALIGN_TAP_MITIGATION``),
    ``extra_args`` vLLM options (``--otlp-traces-endpoint``), ``env_overrides`` other
    variables. ``log_stats``: keep vLLM's request stats, which its tracing needs (vLLM 0.32
    answers a traced request 500 under ``--disable-log-stats``: an assert in its tracing)."""
    env = vllm_env(**(env_overrides or {}))
    if bundle is not None:
        env.update(
            MISALIGN_TAP_BUNDLE=str(bundle),
            MISALIGN_TAP_SIDECAR=sidecar,
            MISALIGN_TAP_MODEL_VERSION=model_version,
            **(tap_env or {}),
        )
    else:
        env.pop("MISALIGN_TAP_BUNDLE", None)
    args = [
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
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.3",
    ]
    if not compiled:
        args.append("--enforce-eager")
    if not log_stats:
        args.append("--disable-log-stats")
    args += extra_args or []
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until(cond: Any, what: str, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    t0 = time.monotonic()
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise MisalignError(f"{what}: a process exited early (status {p.returncode})")
        if time.monotonic() - t0 > timeout:
            raise MisalignError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.5)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), "vLLM", timeout, [proc])


def chat(
    port: int,
    messages: list[dict[str, str]],
    request_id: str,
    max_tokens: int,
    vllm_xargs: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One chat completion; ``vllm_xargs`` reach the engine as the request's ``extra_args``;
    ``headers`` go with it (``traceparent``)."""
    fields: dict[str, Any] = {
        "model": "smollm2",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if vllm_xargs:
        fields["vllm_xargs"] = vllm_xargs
    body = json.dumps(fields).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Request-Id": request_id, **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())
