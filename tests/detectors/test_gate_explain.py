"""`gate --explain` on a planted shift: two tiny models that differ by one known residual vector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.support.cli_runs import error_line, gate
from tests.support.planted import HIDDEN, feature_bundle, make_model, probes


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def explain(tmp_path: Path, shift: np.ndarray, planted_v: np.ndarray) -> tuple[int, dict]:  # type: ignore[type-arg]
    base = make_model(tmp_path / "base", planted_v)
    cand = make_model(tmp_path / "cand", planted_v, mlp_bias=shift, bias_layer=1)
    res = gate(
        "--baseline", base, "--candidate", cand,
        "--bundle", feature_bundle(tmp_path / "b.safetensors", planted_v),
        "--prompts", probes(tmp_path / "probes.jsonl"),
        "--new-tokens", "4", "--explain", "--json",
    )  # fmt: skip
    assert res.returncode in (0, 1), res.stdout + res.stderr
    return res.returncode, json.loads(res.stdout)


def test_explain_finds_a_shift_no_feature_covers(tmp_path: Path, planted_v: np.ndarray) -> None:
    """A bias orthogonal to the only feature: the gate passes (the feature did not move) and the
    explanation's first direction is the planted one, with cosine ~0 to the feature."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=HIDDEN)
    w -= (w @ planted_v) * planted_v
    w /= np.linalg.norm(w)
    code, out = explain(tmp_path, 3.0 * w, planted_v)
    assert code == 0 and out["passed"], out
    first = out["explain"]["directions"][0]
    assert abs(cos(np.asarray(first["vector"]), w)) > 0.99
    assert first["share"] > 0.9 and first["mean_shift"] > 2.5
    assert abs(first["cosines"]["planted"]) < 0.05
    assert abs(out["explain"]["mean_cosines"]["planted"]) < 0.05
    assert len(first["top_answers"]) == 3 and first["top_answers"][0]["prompt"].endswith("?")


def test_explain_names_the_feature_a_shift_runs_along(
    tmp_path: Path, planted_v: np.ndarray
) -> None:
    code, out = explain(tmp_path, 3.0 * planted_v, planted_v)
    assert code == 1 and "planted:mean_shift" in out["decided_by"], out
    first = out["explain"]["directions"][0]
    assert first["cosines"]["planted"] > 0.99 and first["share"] > 0.9
    assert out["explain"]["mean_cosines"]["planted"] > 0.99


def test_explain_needs_two_models(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text('{"features": {"x": {"score": 1}}}\n{"features": {"x": {"score": 2}}}\n')
    assert "--explain reads both models' activations" in error_line(
        gate("--from-scores", f, f, "--explain")
    )
