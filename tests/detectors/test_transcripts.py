"""Transcript files: what each malformed input gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detectors.errors import DataError
from detectors.transcripts import parse_lines, read_jsonl, stratified_sample

OK = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "label": 0,
}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (
            json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
            "field 'messages.0.role': Field required",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "robot", "content": "hi"},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ),
            "field 'messages.0.role'",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "  "},
                    ]
                }
            ),
            "the assistant response (last message) is empty",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            "must end with an assistant turn",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ),
            "no user turn",
        ),
        (json.dumps({"text": "a", "messages": OK["messages"]}), "exactly one of 'messages'"),
        (json.dumps({"label": 1}), "exactly one of 'messages'"),
        (json.dumps({"text": "a", "label": 3}), "field 'label'"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "missing-role",
        "unknown-role",
        "empty-response",
        "no-response",
        "no-user",
        "both-forms",
        "neither-form",
        "bad-label",
    ],
)
def test_bad_lines_name_the_line_and_the_problem(line: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        parse_lines([json.dumps(OK), line], source="data.jsonl")
    assert str(err.value).startswith("data.jsonl:2: ")
    assert message in str(err.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")


def test_text_records_and_split_groups() -> None:
    recs = parse_lines(
        [
            json.dumps({"text": "a statement", "label": 1, "group": "g1"}),
            json.dumps({**OK, "question_id": "quick_buck_json"}),
            json.dumps({**OK, "question_id": "quick_buck"}),
        ]
    )
    assert recs[0].text == "a statement" and recs[0].split_group == "g1"
    assert recs[1].split_group == recs[2].split_group == "quick_buck"


def test_stratified_sample_is_fixed_and_keeps_proportions() -> None:
    lines = [json.dumps({"text": f"t{i}", "label": int(i % 4 == 0)}) for i in range(400)]
    recs = parse_lines(lines)
    a, b = stratified_sample(recs, 100, seed=0), stratified_sample(recs, 100, seed=0)
    assert a == b and len(a) == 100
    assert sum(r.label == 1 for r in a) == 25
