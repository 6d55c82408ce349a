"""The flagged sample's one type and encoding (service/flagged_sample.py): what the sidecar writes
is what the review app reads, and a broken entry keeps what is readable and names the rest."""

from __future__ import annotations

import json

from review.store import Label, Summary, parse_sample, parse_summary
from service.flagged_sample import HEADER_FIELDS, FeatureResult, FlaggedSample, TokenScores

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLE = FlaggedSample(
    request_id="r-1",
    client_request_id="c-1",
    model="m",
    model_version="v2",
    adapter="sql-lora",
    bundle="b-123",
    top_feature="toxic",
    top_score=2.5,
    finished_at=1_800_000_000.125,
    trace_id=TRACE,
    traceparent=f"00-{TRACE}-00f067aa0ba902b7-01",
    mitigation="toxic:ablate@always",
    mitigated_tokens=3,
    features=[
        FeatureResult(name="toxic", score=2.5, threshold=1.0, z=4.0, flagged=True),
        FeatureResult(name="misaligned_persona", score=None),
    ],
    tokens=TokenScores(token_ids=[5, 6, 7], roles=[0, 1, 1], scores={"toxic": [0.5, None, 2.0]}),
    token_text=["a", "b", "c"],
    prompt_text="a",
    response_text="bc",
)


def test_what_the_sidecar_writes_the_review_app_reads_back_whole() -> None:
    fields = SAMPLE.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    read = parse_sample("1-0", fields)
    assert read.problem is None
    assert FlaggedSample.model_validate(read.model_dump(include=set(FlaggedSample.model_fields)))
    for name in FlaggedSample.model_fields:
        assert getattr(read, name) == getattr(SAMPLE, name), name
    summary = parse_summary("1-0", fields)
    assert {n: getattr(summary, n) for n in HEADER_FIELDS} == {
        n: getattr(SAMPLE, n) for n in HEADER_FIELDS
    }


def test_queue_rows_and_labels_carry_the_same_header_as_the_sample() -> None:
    for model in (Summary, Label):
        assert set(HEADER_FIELDS) <= set(model.model_fields), model
    label = Label.from_entry(
        "2-0",
        {
            **SAMPLE.to_fields(),
            "sample_id": "1-0",
            "decision": "misaligned",
            "reviewer": "alice",
            "decided_at": "1800000100.5",
            "claims": "1",
        },
    )
    assert label.trace_id == TRACE and label.top_score == 2.5
    assert [f.name for f in label.features] == ["toxic", "misaligned_persona"]


def test_unset_text_and_trace_are_left_out_of_the_entry() -> None:
    bare = FlaggedSample(request_id="r-2", top_score=1.0, finished_at=1.0)
    fields = bare.to_fields()
    for key in ("trace_id", "traceparent", "prompt_text", "response_text", "token_text", "tokens"):
        assert key not in fields, key
    assert json.loads(fields["features"]) == []


def test_a_broken_entry_keeps_what_is_readable_and_names_the_rest() -> None:
    fields = {
        **SAMPLE.to_fields(),
        "tokens": "{not json",
        "top_score": "high",
        "trace_id": "<script>",
        "mitigated_tokens": "many",
    }
    read = parse_sample("1-0", fields)
    assert read.problem is not None and "field 'tokens'" in read.problem
    assert "field 'mitigated_tokens': not an integer" in read.problem
    assert read.tokens is None and read.top_score is None and read.trace_id == ""
    assert read.mitigated_tokens == 0
    assert read.response_text == "bc" and read.features[0].name == "toxic"
    missing = {k: v for k, v in SAMPLE.to_fields().items() if k != "features"}
    assert parse_sample("1-0", missing).problem == "field 'features' is missing"
    short = {**SAMPLE.to_fields(), "token_text": json.dumps(["a"])}
    assert "token columns ['token_text'] do not have 3 rows" in (
        parse_sample("1-0", short).problem or ""
    )
