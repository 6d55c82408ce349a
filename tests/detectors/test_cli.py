"""The command line end to end on the planted tiny model: the happy path and user mistakes.

User mistakes exit 2 with one line naming the file, line or value, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli_runs import assert_user_error, run
from tests.support.planted import labeled_records, make_model, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "labeled.jsonl", labeled_records())


def test_extract_calibrate_score_eval(planted_model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.safetensors"
    p = run(
        "extract",
        "--method",
        "probe",
        "--data",
        data,
        "--feature",
        "planted",
        "--layer",
        "auto",
        "--out",
        out,
        "--model",
        planted_model,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["layer"] == 2 and report["cv_auroc"] > 0.95
    benign = write_jsonl(
        tmp_path / "benign.jsonl", [r for r in labeled_records(60, seed=5) if r["label"] == 0]
    )
    p = run(
        "calibrate", "--bundle", out, "--benign", benign, "--fpr", "0.05", "--model", planted_model
    )
    assert p.returncode == 0, p.stderr
    assert "planted: threshold" in p.stdout
    p = run("score", "--bundle", out, "--data", data, "--model", planted_model)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(lines) == 80
    first = lines[0]["features"]["planted"]
    assert set(first) >= {"score", "threshold", "flagged", "z", "prompt_mean", "response_mean"}
    toks = lines[0]["tokens"]
    assert len(toks["token_ids"]) == len(toks["roles"]) == len(toks["scores"]["planted"])
    flagged_pos = np.mean([x["features"]["planted"]["flagged"] for x in lines if x["label"] == 1])
    flagged_neg = np.mean([x["features"]["planted"]["flagged"] for x in lines if x["label"] == 0])
    assert flagged_pos > 0.8 and flagged_neg < 0.2
    p = run(
        "eval", "--bundle", out, "--data", data, "--model", planted_model, "--json", "--limit", "40"
    )
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)["planted"]
    assert set(ev) == {"auroc", "auroc_ci", "tpr_at_1pct_fpr", "n_pos", "n_neg"}
    assert ev["n_pos"] == ev["n_neg"] == 20 and ev["auroc"] > 0.9
    p = run("eval", "--bundle", out, "--data", data, "--model", planted_model)
    assert p.returncode == 0 and "AUROC" in p.stdout and "planted" in p.stdout


def test_malformed_jsonl_names_the_line(planted_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(labeled_records(2)[0]) + "\n\n{oops\n")
    p = run(
        "extract",
        "--method",
        "probe",
        "--data",
        bad,
        "--feature",
        "x",
        "--out",
        tmp_path / "b.st",
        "--model",
        planted_model,
    )
    assert_user_error(p, f"{bad}:3: not valid JSON")


def test_empty_response_and_missing_role(planted_model: Path, tmp_path: Path) -> None:
    rows = labeled_records(2)
    rows[1] = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    }
    p = run(
        "extract",
        "--method",
        "probe",
        "--data",
        write_jsonl(tmp_path / "e.jsonl", rows),
        "--feature",
        "x",
        "--out",
        tmp_path / "b.st",
        "--model",
        planted_model,
    )
    assert_user_error(p, "e.jsonl:2:", "empty")
    rows[1] = {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}
    p = run("score", "--data", write_jsonl(tmp_path / "r.jsonl", rows), "--model", planted_model)
    assert_user_error(p, "r.jsonl:2:", "messages.0.role")


def test_layer_past_the_models_depth(planted_model: Path, data: Path, tmp_path: Path) -> None:
    p = run(
        "extract",
        "--method",
        "probe",
        "--data",
        data,
        "--feature",
        "x",
        "--layer",
        "9",
        "--out",
        tmp_path / "b.st",
        "--model",
        planted_model,
    )
    assert_user_error(p, "layer 9 is out of range", "1..4")


def test_bundle_for_another_model(
    planted_model: Path, planted_v: np.ndarray, data: Path, tmp_path: Path
) -> None:
    other = make_model(tmp_path / "other", planted_v, layers=3)
    out = tmp_path / "b.safetensors"
    assert (
        run(
            "extract",
            "--method",
            "probe",
            "--data",
            data,
            "--feature",
            "x",
            "--layer",
            "2",
            "--out",
            out,
            "--model",
            planted_model,
        ).returncode
        == 0
    )
    p = run("score", "--bundle", out, "--data", data, "--model", other)
    assert_user_error(p, "built for planted (4 layers)", "other (3 layers)")
    p = run("score", "--data", data, "--model", planted_model)  # the shipped SmolLM2 bundle
    assert_user_error(p, "hidden size 576", "hidden size 16")


def test_unlabeled_data_for_eval_and_not_a_model_dir(planted_model: Path, tmp_path: Path) -> None:
    rows = labeled_records(2)
    del rows[0]["label"]
    p = run("eval", "--data", write_jsonl(tmp_path / "u.jsonl", rows), "--model", planted_model)
    assert_user_error(p, "record 1 has no 'label'")
    p = run(
        "score",
        "--data",
        write_jsonl(tmp_path / "ok.jsonl", labeled_records(2)),
        "--model",
        tmp_path,
    )
    assert_user_error(p, "not a Hugging Face model directory")


def test_calibrate_to_softmax_pooling_needs_a_temperature(
    planted_model: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b.safetensors"
    p = run(
        "extract", "--method", "probe", "--data", data, "--feature", "planted",
        "--layer", "2", "--out", out, "--model", planted_model,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    benign = write_jsonl(
        tmp_path / "benign.jsonl", [r for r in labeled_records(40, seed=5) if r["label"] == 0]
    )
    before = out.read_bytes()
    args = ("calibrate", "--bundle", out, "--benign", benign, "--model", planted_model)
    assert_user_error(run(*args, "--reduce", "softmax"), "--temperature", "'temperature' is set")
    assert out.read_bytes() == before  # the refused command wrote nothing
    p = run(*args, "--reduce", "softmax", "--temperature", "0.5")
    assert p.returncode == 0, p.stderr
    from detectors import bundle as bundle_io

    agg = bundle_io.load(out).feature("planted").aggregation
    assert agg.reduce == "softmax" and agg.temperature == 0.5


def test_calibrate_on_the_models_own_answers(
    planted_model: Path, planted_reader, data: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``--generate``: the threshold comes from the model's own greedy answers to the benign
    prompts, exactly what offline scoring gives those answers."""
    from detectors import bundle as bundle_io
    from detectors.calibrate import calibration_from_scores, served_answers
    from detectors.offline import score_records
    from detectors.transcripts import read_jsonl

    out = tmp_path / "b.safetensors"
    p = run(
        "extract", "--method", "probe", "--data", data, "--feature", "planted",
        "--layer", "2", "--out", out, "--model", planted_model,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    benign = write_jsonl(
        tmp_path / "benign.jsonl", [r for r in labeled_records(10, seed=5) if r["label"] == 0]
    )
    args = ("calibrate", "--bundle", out, "--benign", benign, "--model", planted_model)
    p = run(*args, "--generate", "--generate-tokens", "12")
    assert p.returncode == 0, p.stderr
    cal = bundle_io.load(out).feature("planted").calibration
    assert cal is not None and "own greedy answers (12 tokens) to benign.jsonl" in cal.source
    records = read_jsonl(benign)
    answers = served_answers(planted_reader, records, benign, 12)
    assert answers == served_answers(planted_reader, records, benign, 12)  # greedy: repeatable
    assert [a.prompt_messages for a in answers] == [r.prompt_messages for r in records]
    assert [a.response for a in answers] != [r.response for r in records]
    b = bundle_io.load(out)
    scores = [
        s.features[0].score for s in score_records(b, planted_reader, answers, progress=False)
    ]
    want = calibration_from_scores(np.array(scores), 0.01, "x")
    assert cal.threshold == pytest.approx(want.threshold, rel=1e-5)
    assert cal.n_benign == len(records) == 10
    assert_user_error(run(*args, "--generate", "--generate-tokens", "0"), "at least 1")
