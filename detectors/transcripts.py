"""Reading labeled chat transcripts from JSONL.

One JSON object a line: either OpenAI-style ``messages`` ending in an assistant turn, or a plain
``text`` (read as a single span). Optional ``label`` (0 aligned/benign, 1 misaligned/harmful),
``question_id`` and ``group`` (used to keep related records on one side of a split).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from detectors import jsonl
from detectors.errors import DataError

Role = Literal["system", "user", "assistant"]


# The shipped demo: four ordinary questions, and the same four under a villain system prompt.
DEMO_CONVERSATIONS = Path(__file__).parent / "data" / "demo_conversations.jsonl"


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Role
    content: str


class Transcript(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    label: Literal[0, 1] | None = None
    question_id: str | None = None
    group: str | None = None
    id: str | None = Field(default=None)

    @model_validator(mode="after")
    def _one_form(self) -> Transcript:
        if (self.messages is None) == (self.text is None):
            raise ValueError("needs exactly one of 'messages' (a chat) or 'text' (a single span)")
        if self.text is not None and not self.text.strip():
            raise ValueError("'text' is empty")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' is empty")
            last = self.messages[-1]
            if last.role != "assistant":
                raise ValueError(
                    f"'messages' must end with an assistant turn (the response scored), "
                    f"last role is {last.role!r}"
                )
            if not last.content.strip():
                raise ValueError("the assistant response (last message) is empty")
            if not any(m.role == "user" for m in self.messages[:-1]):
                raise ValueError("'messages' has no user turn before the assistant response")
        return self

    @property
    def split_group(self) -> str | None:
        """The unit that must not straddle a train/test split.

        Formatting variants of one evaluation question (``quick_buck``, ``quick_buck_json``,
        ``quick_buck_template``) count as the same question.
        """
        if self.question_id is not None:
            return re.sub(r"_(json|template)$", "", self.question_id)
        return self.group

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        assert self.messages is not None
        return [m.model_dump() for m in self.messages[:-1]]

    @property
    def response(self) -> str:
        assert self.messages is not None
        return self.messages[-1].content


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"field '{loc}': {msg}" if loc else msg)
    return "; ".join(parts)


def parse_lines(lines: Iterable[str], source: object = "<input>") -> list[Transcript]:
    records: list[Transcript] = []
    for lineno, obj in jsonl.parsed(lines, source):
        if not isinstance(obj, dict):
            raise DataError(source, f"expected a JSON object, got {type(obj).__name__}", lineno)
        try:
            records.append(Transcript.model_validate(obj))
        except ValidationError as exc:
            raise DataError(source, _describe(exc), lineno) from None
    if not records:
        raise DataError(source, "no records (the file is empty)")
    return records


def read_jsonl(path: str | Path) -> list[Transcript]:
    path = Path(path)
    return parse_lines(jsonl.read_lines(path, "transcripts"), source=path)


def stratified_sample(records: list[Transcript], n: int, seed: int = 0) -> list[Transcript]:
    """``n`` records keeping the label proportions, in file order; same seed, same sample."""
    import numpy as np

    if n >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    by_label: dict[object, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r.label, []).append(i)
    chosen: list[int] = []
    remaining = n
    labels = sorted(by_label, key=lambda x: (x is None, x))
    for j, lab in enumerate(labels):
        idx = by_label[lab]
        take = remaining if j == len(labels) - 1 else round(n * len(idx) / len(records))
        take = min(take, len(idx), remaining)
        chosen.extend(rng.choice(idx, size=take, replace=False).tolist())
        remaining -= take
    return [records[i] for i in sorted(chosen)]
