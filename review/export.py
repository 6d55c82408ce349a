"""Reviewers' labels as other labelling tools import them, each with its sample's text.

- Label Studio: one task per label, ``data`` holding the prompt, the response and the monitor's
  fields; the reviewer's decision as an ``annotations`` result (a ``choices`` control named
  ``decision`` on the ``response`` text, the note as a ``textarea`` named ``note``); the
  monitor's flag as a ``predictions`` result (``misaligned``, scored with the top feature's
  score). The labelling config these names fit is in docs/review.md.
  https://labelstud.io/guide/task_format, https://labelstud.io/guide/predictions
- Argilla 2: one record per label (``id``, ``fields``: prompt and response, ``metadata``,
  ``suggestions`` and, given an Argilla user id, ``responses``), for a dataset whose settings
  have text fields ``prompt`` and ``response`` and a label question ``decision``.
  https://docs.argilla.io/latest/reference/argilla/records/records,
  https://docs.argilla.io/latest/how_to_guides/record

The text comes from the flagged stream (an acknowledged entry stays there until the stream is
trimmed to its maxlen); a label whose sample was trimmed exports without text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from review.store import Label, ReviewStore

DECISION_CONTROL, NOTE_CONTROL, TEXT_OBJECT = "decision", "note", "response"


@dataclass(frozen=True)
class Text:
    prompt: str
    response: str


async def sample_texts(store: ReviewStore, labels: Sequence[Label]) -> dict[str, Text]:
    """Prompt and response of each labelled sample still in the stream (one round trip per
    hundred labels)."""
    out: dict[str, Text] = {}
    ids = list(dict.fromkeys(label.sample_id for label in labels))
    for i in range(0, len(ids), 100):
        pipe = store.client.pipeline(transaction=False)
        for sid in ids[i : i + 100]:
            pipe.xrange(store.stream, sid, sid)
        for sid, entries in zip(ids[i : i + 100], await store._call(pipe.execute()), strict=True):
            if entries:
                fields = entries[0][1]
                out[sid] = Text(fields.get("prompt_text") or "", fields.get("response_text") or "")
    return out


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _monitor(label: Label) -> dict[str, Any]:
    return {
        "sample_id": label.sample_id,
        "request_id": label.request_id,
        "client_request_id": label.client_request_id,
        "model": label.model,
        "model_version": label.model_version,
        "bundle": label.bundle,
        "top_feature": label.top_feature,
        "top_score": label.top_score,
        "finished_at": _iso(label.finished_at),
    }


def label_studio_task(label: Label, text: Text | None) -> dict[str, Any]:
    result: list[dict[str, Any]] = [
        {
            "id": f"{label.id}-decision",
            "from_name": DECISION_CONTROL,
            "to_name": TEXT_OBJECT,
            "type": "choices",
            "value": {"choices": [label.decision]},
        }
    ]
    if label.note:
        result.append(
            {
                "id": f"{label.id}-note",
                "from_name": NOTE_CONTROL,
                "to_name": TEXT_OBJECT,
                "type": "textarea",
                "value": {"text": [label.note]},
            }
        )
    task: dict[str, Any] = {
        "data": {
            "prompt": text.prompt if text else "",
            "response": text.response if text else "",
            **_monitor(label),
            "reviewer": label.reviewer,
            "scores": {f.name: f.score for f in label.features},
        },
        "annotations": [
            {
                "result": result,
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": _iso(label.decided_at),
            }
        ],
    }
    if label.top_score is not None:
        # The monitor flagged the sample: its prediction is "misaligned".
        task["predictions"] = [
            {
                "model_version": label.bundle or "misalign-monitor",
                "score": label.top_score,
                "result": [
                    {
                        "id": f"{label.id}-flag",
                        "from_name": DECISION_CONTROL,
                        "to_name": TEXT_OBJECT,
                        "type": "choices",
                        "value": {"choices": ["misaligned"]},
                    }
                ],
            }
        ]
    return task


def argilla_record(label: Label, text: Text | None, user_id: str | None) -> dict[str, Any]:
    metadata = {
        k: v
        for k, v in {
            **_monitor(label),
            "reviewer": label.reviewer,
            "note": label.note,
            "decided_at": _iso(label.decided_at),
        }.items()
        if v not in (None, "")
    }
    record: dict[str, Any] = {
        "id": label.sample_id,
        "fields": {
            "prompt": text.prompt if text else "",
            "response": text.response if text else "",
        },
        "metadata": metadata,
        "suggestions": {
            DECISION_CONTROL: {
                "value": label.decision,
                "agent": f"misalign-monitor review: {label.reviewer}",
                "type": "human",
            }
        },
    }
    if user_id is not None:
        record["responses"] = {DECISION_CONTROL: [{"value": label.decision, "user_id": user_id}]}
    return record
