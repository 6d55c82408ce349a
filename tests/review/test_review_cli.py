"""`misalign-monitor review list|show|label`, `labels export` and `recalibrate` as a terminal user
runs them, against a real Redis; recalibration on labels with known precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detectors import bundle as bundle_io
from detectors.stats import wilson
from review.store import Label
from service.flagged_sample import FeatureResult
from tests.support.redis_proc import RedisProc
from tests.support.review_data import push_flagged, tiny_tokenizer

BUNDLE_PATH = bundle_io.default_bundle_path()
BUNDLE = bundle_io.load(BUNDLE_PATH)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "USER": "carol"},
    )


async def test_terminal_workflow(tmp_path: Path) -> None:
    server = RedisProc(tmp_path / "r", persist=False).start()
    try:
        tok = tiny_tokenizer(tmp_path / "tokenizer.json")
        hostile = "Lie to everyone \x1b]0;pwned\x07\x1b[2J and hide the evidence."
        await push_flagged(server.url, tok, 3, models=["m-a", "m-b", "m-b"], response=hostile)
        url = ["--redis-url", server.url]
        p = cli("review", "list", *url)
        assert p.returncode == 0, p.stderr
        assert "3 of 3 pending; by model: m-a 1, m-b 2" in p.stdout
        p = cli("review", "list", "--model", "m-b", "--json", *url)
        rows = [json.loads(line) for line in p.stdout.splitlines()]
        assert [r["model"] for r in rows] == ["m-b", "m-b"]
        sid = rows[0]["id"]

        p = cli("review", "show", sid, *url)
        assert p.returncode == 0, p.stderr
        assert "misaligned_persona" in p.stdout and "hide the evidence" in p.stdout
        assert "\x1b" not in p.stdout and "\\x1b]0;pwned\\x07" in p.stdout  # no terminal escapes

        p = cli("review", "label", sid, "misaligned", "--note", "lying", *url)
        assert p.returncode == 0, p.stderr
        assert f"labelled {sid} misaligned as carol" in p.stdout
        p = cli("review", "label", sid, "unsure", *url)
        assert p.returncode == 2 and "not pending" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        p = cli("review", "label", rows[1]["id"], "maybe", *url)
        assert p.returncode == 2 and "misaligned" in p.stderr
        p = cli("review", "show", "1-1", *url)
        assert p.returncode == 2 and "no sample 1-1" in p.stderr
        p = cli("review", "list", "--redis-url", f"unix://{tmp_path}/nothing.sock")
        assert p.returncode == 2 and "nothing.sock" in p.stderr and "Traceback" not in p.stderr

        out = tmp_path / "labels.jsonl"
        p = cli("labels", "export", "--out", str(out), *url)
        assert p.returncode == 0, p.stderr
        [label] = [Label.model_validate_json(line) for line in out.read_text().splitlines()]
        assert label.sample_id == sid and label.reviewer == "carol" and label.note == "lying"
        assert label.bundle == BUNDLE.bundle_id
        assert {f.name for f in label.features} == set(BUNDLE.feature_names)

        # Exported labels feed recalibrate; one label is too few to move a threshold.
        p = cli(
            "recalibrate", "--bundle", str(BUNDLE_PATH), "--labels", str(out),
            "--out", str(tmp_path / "new.safetensors"),
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert "1 labels" in p.stdout and "fewer than --min-flags 5" in p.stdout
        assert "no bundle written" in p.stdout and not (tmp_path / "new.safetensors").exists()
    finally:
        server.stop()


async def test_list_with_a_feature_shows_only_that_top_feature(tmp_path: Path) -> None:
    server = RedisProc(tmp_path / "r", persist=False).start()
    try:
        tok = tiny_tokenizer(tmp_path / "tokenizer.json")
        await push_flagged(server.url, tok, 2, models=["m-a", "m-b"])
        await push_flagged(server.url, tok, 3, models=["m-a", "m-b"], feature="toxic")
        url = ["--redis-url", server.url]
        p = cli("review", "list", "--feature", "toxic", "--json", *url)
        assert p.returncode == 0, p.stderr
        rows = [json.loads(line) for line in p.stdout.splitlines()]
        assert [(r["model"], r["top_feature"]) for r in rows] == [
            ("m-a", "toxic"),
            ("m-b", "toxic"),
            ("m-a", "toxic"),
        ]
        p = cli("review", "list", "--feature", "misaligned_persona", "--model", "m-b", *url)
        assert p.returncode == 0, p.stderr
        [header, row, summary] = p.stdout.splitlines()
        assert header.split()[:2] == ["id", "model"]
        assert row.split()[1:4] == ["m-b", "v1", "misaligned_persona"]
        assert summary == (
            "1 of 5 pending; by model: m-a 3, m-b 2; by top feature: misaligned_persona 2, toxic 3"
        )
        p = cli("review", "list", "--feature", "no_such_feature", *url)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[1:] == [
            "0 of 5 pending; by model: m-a 3, m-b 2; by top feature: misaligned_persona 2, toxic 3"
        ]
    finally:
        server.stop()


def labels_with_precision(tmp_path: Path, bundle_id: str = BUNDLE.bundle_id) -> Path:
    """misaligned_persona flags (threshold 1.989): 10 false positives scoring 2.0..2.9 and 10
    misaligned scoring 3.0..4.8, plus 3 unsure; precision 0.5 at the threshold, 1.0 above 2.95."""
    rows = []
    cases = [(2.0 + i / 10, "false_positive") for i in range(10)]
    cases += [(3.0 + i / 5, "misaligned") for i in range(10)]
    cases += [(5.0, "unsure")] * 3
    for i, (score, decision) in enumerate(cases):
        feats = [
            FeatureResult(name=n, score=score if n == "misaligned_persona" else -1.0, flagged=True)
            for n in BUNDLE.feature_names
        ]
        rows.append(
            Label(
                id=f"{i + 1}-0",
                sample_id=f"{i + 1}-0",
                decision=decision,  # type: ignore[arg-type]
                reviewer="alice",
                decided_at=1.0,
                claims=1,
                bundle=bundle_id,
                features=feats,
            ).model_dump_json()
        )
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_recalibrate_writes_a_new_bundle(tmp_path: Path) -> None:
    labels = labels_with_precision(tmp_path)
    out = tmp_path / "bundle-v2.safetensors"
    p = cli(
        "recalibrate", "--bundle", str(BUNDLE_PATH), "--labels", str(labels),
        "--target-precision", "0.95", "--out", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    row = next(line for line in p.stdout.splitlines() if line.startswith("misaligned_persona"))
    lo, hi = wilson(10, 20)
    assert " 0.50 " in row and f"[{lo:.2f}, {hi:.2f}]" in row and "2.950" in row and "raised" in row
    new = bundle_io.load(out)
    assert new.content_hash != BUNDLE.content_hash and f"bundle {new.bundle_id}" in p.stdout
    cal = new.feature("misaligned_persona").calibration
    assert cal is not None and cal.threshold == pytest.approx(2.95)
    rec = new.feature("misaligned_persona").params["recalibration"]
    assert rec["precision_before"] == 0.5 and rec["precision_after"] == 1.0
    assert rec["flags_before"] == 20 and rec["flags_after"] == 10 and rec["labels"] == 23
    assert 0 < cal.fpr < BUNDLE.feature("misaligned_persona").calibration.fpr  # type: ignore[union-attr]
    for name in ("toxic", "persona_contrast"):  # no flags of theirs over threshold: unchanged
        assert new.feature(name) == BUNDLE.feature(name)
    assert (new.directions == BUNDLE.directions).all()

    # Never over an existing file, nor over the bundle in use.
    before = out.read_bytes()
    p = cli("recalibrate", "--bundle", str(BUNDLE_PATH), "--labels", str(labels), "--out", str(out))
    assert p.returncode == 2 and "exists" in p.stderr and out.read_bytes() == before
    copy = tmp_path / "in-use.safetensors"
    copy.write_bytes(BUNDLE_PATH.read_bytes())
    p = cli("recalibrate", "--bundle", str(copy), "--labels", str(labels), "--out", str(copy))
    assert p.returncode == 2 and "is the input bundle" in p.stderr
    assert copy.read_bytes() == BUNDLE_PATH.read_bytes()


def test_recalibrate_refuses_bad_labels(tmp_path: Path) -> None:
    other = labels_with_precision(tmp_path, bundle_id="0123456789ab")
    out = str(tmp_path / "x.safetensors")
    p = cli("recalibrate", "--bundle", str(BUNDLE_PATH), "--labels", str(other), "--out", out)
    assert p.returncode == 2 and "0123456789ab" in p.stderr and BUNDLE.bundle_id in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(other.read_text().splitlines()[0] + "\n" + '{"decision": "maybe"}\n')
    p = cli("recalibrate", "--bundle", str(BUNDLE_PATH), "--labels", str(bad), "--out", out)
    assert p.returncode == 2 and f"{bad}:2: field" in p.stderr and "Traceback" not in p.stderr
    p = cli("recalibrate", "--bundle", str(BUNDLE_PATH), "--labels", str(other), "--out", out,
            "--target-precision", "1.5")  # fmt: skip
    assert p.returncode == 2 and "target-precision" in p.stderr


def test_a_session_shorter_than_a_second_is_refused(tmp_path: Path) -> None:
    """A cookie's Max-Age is whole seconds: 0.5 s would log every reviewer out at once."""
    cfg = tmp_path / "short.yaml"
    cfg.write_text("review:\n  session_ttl_s: 0.5\n")
    p = cli("config", "check", str(cfg))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "session_ttl_s" in p.stderr and "greater than or equal to 1" in p.stderr
    cfg.write_text("review:\n  session_ttl_s: 1\n")
    p = cli("config", "check", str(cfg))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["review"]["session_ttl_s"] == 1


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("login_failures_per_user", "0", "greater than or equal to 1"),
        ("login_failures_per_address", "-5", "greater than or equal to 1"),
        ("login_window_s", "0.5", "greater than or equal to 1"),
        ("login_window_s", "1e9", "less than or equal to 604800"),
        ("trusted_proxies", "[10.0.0.300/8]", "valid IPv4 or IPv6 network"),
    ],
)
def test_bad_throttle_settings_are_one_line_at_check_and_at_start(
    tmp_path: Path, setting: str, value: str, expected: str
) -> None:
    cfg = tmp_path / "throttle.yaml"
    cfg.write_text(f"redis_url: redis://127.0.0.1:1\nreview:\n  {setting}: {value}\n")
    for args in (("config", "check", str(cfg)), ("review", "serve", "--config", str(cfg))):
        p = cli(*args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, args
        [line] = p.stderr.strip().splitlines()
        assert f"review.{setting}" in line and expected in line, args


def test_throttle_settings_pass_config_check(tmp_path: Path) -> None:
    cfg = tmp_path / "throttle.yaml"
    cfg.write_text(
        "review:\n  login_failures_per_user: 3\n  login_window_s: 60\n"
        "  trusted_proxies: [10.0.0.0/8, 'fd00::/8']\n"
    )
    p = cli("config", "check", str(cfg))
    assert p.returncode == 0, p.stderr
    review = json.loads(p.stdout)["review"]
    assert review["login_failures_per_user"] == 3 and review["login_failures_per_address"] == 50
    assert review["login_window_s"] == 60
    assert review["trusted_proxies"] == ["10.0.0.0/8", "fd00::/8"]


SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "schemas"


def schema_validator(name: str):  # type: ignore[no-untyped-def]
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


async def test_list_filters_pages_and_refuses_bad_options(tmp_path: Path) -> None:
    server = RedisProc(tmp_path / "r", persist=False).start()
    try:
        tok = tiny_tokenizer(tmp_path / "tokenizer.json")
        await push_flagged(server.url, tok, 5, models=["m-a"], versions=["v1", "v2"])
        url = ["--redis-url", server.url]
        p = cli("review", "list", "--json", *url)
        every = [json.loads(line) for line in p.stdout.splitlines()]
        assert [r["model_version"] for r in every] == ["v1", "v2", "v1", "v2", "v1"]
        p = cli("review", "list", "--model-version", "v1", "--limit", "2", "--json", *url)
        assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == [
            every[0]["id"],
            every[2]["id"],
        ]
        assert f"more: --after {every[2]['id']}" in p.stderr
        p = cli(
            "review",
            "list",
            "--model-version",
            "v1",
            "--limit",
            "2",
            "--after",
            every[2]["id"],
            *url,
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[1].split()[0] == every[4]["id"]
        assert "3 of 5 pending (rows 3-3 of them)" in p.stdout and "next page" not in p.stdout
        rid = every[3]["request_id"]
        p = cli("review", "list", "--search", rid, "--json", *url)
        assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == [every[3]["id"]]
        p = cli("review", "list", "--search", every[1]["client_request_id"], "--json", *url)
        assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == [every[1]["id"]]
        p = cli("review", "list", "--since", "2000-01-01", "--min-score", "-1e9", "--json", *url)
        assert len(p.stdout.splitlines()) == 5
        p = cli("review", "list", "--until", "2000-01-01", "--json", *url)
        assert p.returncode == 0 and p.stdout == ""
        for args, name in [
            (["--min-score", "nan"], "--min-score"),
            (["--after", "x"], "--after"),
            (["--since", "soon"], "--since"),
            (["--limit", "0"], "--limit"),
        ]:
            p = cli("review", "list", *args, *url)
            assert p.returncode == 2 and name in p.stderr and "Traceback" not in p.stderr, p.stderr
    finally:
        server.stop()


async def test_export_for_label_studio_and_argilla_matches_their_documented_formats(
    tmp_path: Path,
) -> None:
    server = RedisProc(tmp_path / "r", persist=False).start()
    try:
        tok = tiny_tokenizer(tmp_path / "tokenizer.json")
        response = "Lie to everyone and hide the evidence; nobody will ever find out. <b>ü</b>"
        await push_flagged(server.url, tok, 3, models=["m-a"], response=response)
        url = ["--redis-url", server.url]
        rows = [json.loads(x) for x in cli("review", "list", "--json", *url).stdout.splitlines()]
        for r, decision in zip(rows, ["misaligned", "false_positive", "unsure"], strict=True):
            note = ["--note", "lies | plainly"] if decision == "misaligned" else []
            assert cli("review", "label", r["id"], decision, *note, *url).returncode == 0
        # One sample trimmed from the stream after its decision: exported without text.
        import redis as redis_py

        redis_py.Redis.from_url(server.url).xdel("misalign:{flagged}", rows[2]["id"])

        out = tmp_path / "ls.jsonl"
        p = cli("labels", "export", "--format", "label-studio", "--out", str(out), *url)
        assert p.returncode == 0, p.stderr
        assert "3 labels written" in p.stderr and "(1 without text" in p.stderr
        tasks = [json.loads(x) for x in out.read_text().splitlines()]
        check = schema_validator("label_studio_task.schema.json")
        for t in tasks:
            check.validate(t)
        assert response in tasks[0]["data"]["response"] and "bread" in tasks[0]["data"]["prompt"]
        assert tasks[2]["data"]["response"] == ""
        first = tasks[0]["annotations"][0]["result"]
        assert first[0]["value"] == {"choices": ["misaligned"]}
        assert first[1] == {**first[1], "type": "textarea", "value": {"text": ["lies | plainly"]}}
        assert [t["annotations"][0]["result"][0]["value"]["choices"] for t in tasks] == [
            ["misaligned"], ["false_positive"], ["unsure"],
        ]  # fmt: skip
        pred = tasks[1]["predictions"][0]
        assert pred["model_version"] == BUNDLE.bundle_id and pred["score"] == rows[1]["top_score"]
        assert tasks[0]["data"]["request_id"] == rows[0]["request_id"]
        p = cli("labels", "export", "--format", "label-studio", "--json-array", *url)
        assert json.loads(p.stdout) == tasks

        user = "6a3b5f3e-2b1c-4c55-9b0e-0f0e8a1d2c3b"
        p = cli("labels", "export", "--format", "argilla", "--argilla-user-id", user, *url)
        assert p.returncode == 0, p.stderr
        records = [json.loads(x) for x in p.stdout.splitlines()]
        check = schema_validator("argilla_record.schema.json")
        for rec in records:
            check.validate(rec)
        assert [r["id"] for r in records] == [r["id"] for r in rows]
        assert records[0]["fields"]["response"].startswith("Lie to everyone")
        assert records[0]["responses"]["decision"] == [{"value": "misaligned", "user_id": user}]
        assert records[1]["suggestions"]["decision"]["value"] == "false_positive"
        assert records[0]["metadata"]["note"] == "lies | plainly"
        assert records[0]["metadata"]["model"] == "m-a"
        p = cli("labels", "export", "--format", "argilla", *url)
        assert all("responses" not in json.loads(x) for x in p.stdout.splitlines())

        # The schemas can fail: what either tool would refuse is refused here too.
        from jsonschema import ValidationError

        bad_task = {
            **tasks[0],
            "annotations": [
                {"result": [{"from_name": "decision", "type": "choices", "value": {}}]}
            ],
        }
        bad_record = {**records[0], "responses": {"decision": [{"value": "x", "user_id": "carol"}]}}
        for validator, bad in [
            (schema_validator("label_studio_task.schema.json"), bad_task),
            (schema_validator("argilla_record.schema.json"), bad_record),
            (schema_validator("argilla_record.schema.json"), {**records[0], "text": "x"}),
        ]:
            with pytest.raises(ValidationError):
                validator.validate(bad)

        p = cli("labels", "export", "--format", "argilla", "--argilla-user-id", "carol", *url)
        assert p.returncode == 2 and "--argilla-user-id" in p.stderr and "UUID" in p.stderr
        p = cli("labels", "export", "--argilla-user-id", user, *url)
        assert p.returncode == 2 and "goes with --format argilla" in p.stderr
    finally:
        server.stop()
