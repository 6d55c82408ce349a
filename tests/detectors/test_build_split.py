"""The bundle build's sample of the emergent-misalignment dev data (no model needed)."""

from __future__ import annotations

import hashlib

from scripts.build_bundle import em_split
from tests.support import DEV_DATA

EM = DEV_DATA / "emergent_misalignment" / "dev.jsonl"


def _digest(records) -> str:  # type: ignore[no-untyped-def]
    text = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_per_class_split_is_the_shipped_bundles_training_file() -> None:
    """375 of each label is the sample the shipped bundle's spec names by digest."""
    train, benign = em_split(EM, 375, 400)
    assert _digest(train) == "87af02e8ebf1c826"
    assert sum(r.label for r in train) == 375 and len(train) == 750
    assert len(benign) == 400 and all(r.label == 0 for r in benign)
    assert not {r.model_dump_json() for r in train} & {r.model_dump_json() for r in benign}


def test_every_record_split_holds_out_only_the_calibration_answers() -> None:
    train, benign = em_split(EM, None, 400)
    lines = EM.read_text().splitlines()
    assert len(train) + len(benign) == len(lines) == 3226
    assert sum(r.label for r in train) == 375  # every misaligned answer is trained on
    assert all(r.label == 0 for r in benign)
    assert not {r.model_dump_json() for r in train} & {r.model_dump_json() for r in benign}
