"""vLLM child runs for the end-to-end tests (scripts/vllm_run.py in a subprocess), and what the
tests read from what the tap sent: rows by request and position, and their parity with
transformers' hidden states projected offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from detectors import bundle as bundle_io
from detectors.activations import ActivationReader
from detectors.scoring import project, token_scores
from detectors.transcripts import DEMO_CONVERSATIONS
from service.vllm_server import vllm_env
from tests.support import ROOT
from wire import monitor_pb2 as pb

BUNDLE = bundle_io.default_bundle_path()


def prompts(tmp_path: Path) -> Path:
    out = tmp_path / "prompts.jsonl"
    rows = [json.loads(x) for x in DEMO_CONVERSATIONS.read_text().splitlines()]
    out.write_text("".join(json.dumps({"messages": r["messages"][:-1]}) + "\n" for r in rows))
    return out


def run_vllm(
    model: Path,
    data: Path,
    *extra: str,
    timeout: int = 900,
    env: dict[str, str] | None = None,
    engine_process: bool = False,
) -> dict:  # type: ignore[type-arg]
    """One vLLM child run. The engine runs inside the child unless ``engine_process``: the tap is
    the same code either way, and each engine process costs a fresh import of vLLM (about 15 s,
    twice: the engine core and its worker), which CI pays per test. The SmolLM2 parity runs keep
    the processes users run."""
    env = dict(env or vllm_env(VLLM_LOGGING_LEVEL="WARNING"))
    if not engine_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    p = vllm_run(model, data, list(extra), timeout, env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    out["log"] = p.stdout + p.stderr
    return out  # type: ignore[no-any-return]


def failed_start(
    model: Path, data: Path, bundle: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A vLLM start with the tap that must fail: the finished process, asserted non-zero."""
    p = vllm_run(model, data, ["--tap", str(bundle)], 600, env)
    assert p.returncode != 0
    return p


def vllm_run(
    model: Path, data: Path, extra: list[str], timeout: int, env: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    """scripts/vllm_run.py on ``model`` and ``data`` with ``extra`` arguments, finished."""
    cmd = [sys.executable, str(ROOT / "scripts" / "vllm_run.py"), "--model", str(model)]
    cmd += ["--data", str(data), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def received_rows(
    batches: list[pb.StepBatch], k: int
) -> dict[str, dict[int, tuple[int, int, np.ndarray]]]:
    """request id -> position -> (token id, role, projections); a later write wins."""
    out: dict[str, dict[int, tuple[int, int, np.ndarray]]] = {}
    for b in batches:
        pos = np.frombuffer(b.positions, "<u4")
        tok = np.frombuffer(b.token_ids, "<u4")
        roles = np.frombuffer(b.is_response, np.int8)
        proj = np.frombuffer(b.projections, "<f4").reshape(-1, k)
        for i, rid in enumerate(b.request_ids):
            for r in range(b.row_offsets[i], b.row_offsets[i + 1]):
                out.setdefault(rid, {})[int(pos[r])] = (int(tok[r]), int(roles[r]), proj[r])
    return out


def check_parity(
    result: dict,  # type: ignore[type-arg]
    batches: list[pb.StepBatch],
    model: Path,
    bundle: Path = BUNDLE,
) -> int:
    b = bundle_io.load(bundle)
    rows = received_rows(batches, b.k)
    finished = {f.client_request_id: f.request_id for x in batches for f in x.finished}
    reader = ActivationReader(model)
    checked = 0
    for out in result["outputs"]:
        internal = finished[out["request_id"]]  # every request's finish arrived, by client id
        got = rows[internal]
        # The engine feeds the prompt and every generated token but the last.
        seq = out["prompt_token_ids"] + out["output_token_ids"][:-1]
        n_prompt = len(out["prompt_token_ids"])
        roles = [0] * n_prompt + [1] * (len(seq) - n_prompt)
        layers = b.tapped_layers or [b.spec.layer]
        acts = next(reader.read_encoded([(seq, roles)], layers, progress=False))
        # The tap sends activations: the projection plus bias (JumpReLU for SAE latents), each
        # column after its own layer.
        offline = token_scores(b, project(b, acts.layers))
        assert set(got) <= set(range(len(seq)))
        assert (
            len(got) >= len(seq) - n_prompt
        )  # all response rows; cached prompt rows may be absent
        for pos, (tok, role, proj) in got.items():
            assert tok == seq[pos] and role == roles[pos]
            np.testing.assert_allclose(
                proj, offline[pos], rtol=1e-3, atol=1e-3 * np.abs(offline).max()
            )
            checked += 1
    return checked
