"""Which queue rows a reviewer asked for: filters, search and a cursor, from hostile input.

The web page's query string and the CLI's options both become one ``QueueQuery``; a value that
does not fit raises ``QueryError`` naming the parameter (the page answers 400 with it). Paging is
by cursor: ``after`` is the last entry id of the previous page, so a page stays right while
samples ahead of it are decided (an offset would skip rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from detectors.errors import MisalignError
from review.store import Summary

ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
MAX_LIMIT = 5000
# Query-string names (the page) to field names; the CLI uses the field names as options.
PARAMS = {
    "model": "model",
    "model_version": "model_version",
    "feature": "feature",
    "q": "search",
    "min_score": "min_score",
    "max_score": "max_score",
    "since": "since",
    "until": "until",
    "after": "after",
    "limit": "limit",
}
FILTER_PARAMS = tuple(k for k in PARAMS if k not in ("after", "limit"))


class QueryError(MisalignError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"parameter {param!r}: {message}")
        self.param = param


def _time(value: Any) -> float | None:
    """Epoch seconds, or ISO 8601 (a date, or a date and time; no zone means UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            out = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(
                    "expected epoch seconds or an ISO 8601 time such as 2026-12-01T12:00"
                ) from None
            out = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(out) or out < 0:
        raise ValueError("expected a time after 1970")
    return out


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class QueueQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, max_length=200)
    model_version: str | None = Field(default=None, max_length=200)
    feature: str | None = Field(default=None, max_length=200)
    search: str | None = Field(
        default=None, max_length=200, description="part of the request id or the client's id"
    )
    min_score: float | None = Field(default=None, allow_inf_nan=False)
    max_score: float | None = Field(default=None, allow_inf_nan=False)
    since: float | None = None
    until: float | None = None
    after: str | None = Field(default=None, max_length=41)
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)

    @field_validator("since", "until", mode="before")
    @classmethod
    def _times(cls, value: Any) -> float | None:
        return _time(value)

    @field_validator("after")
    @classmethod
    def _after(cls, value: str | None) -> str | None:
        if value is not None and not ENTRY_ID.fullmatch(value):
            raise ValueError("expected a stream entry id such as 1733054400000-0")
        return value

    @field_validator("model", "model_version", "feature", "search")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("control characters are not allowed")
        return value or None

    @model_validator(mode="after")
    def _ranges(self) -> QueueQuery:
        if None not in (self.min_score, self.max_score) and self.min_score > self.max_score:  # type: ignore[operator]
            raise ValueError("max_score: below min_score")
        if None not in (self.since, self.until) and self.since > self.until:  # type: ignore[operator]
            raise ValueError("until: before since")
        return self

    @classmethod
    def parse(cls, values: Mapping[str, Any], names: Mapping[str, str] = PARAMS) -> QueueQuery:
        """``values`` keyed by ``names``' keys (query-string names by default); empty values
        are not given; a repeated parameter is refused rather than one of its values guessed."""
        data: dict[str, Any] = {}
        for param, fieldname in names.items():
            got = values.getall(param) if hasattr(values, "getall") and param in values else None
            if got is not None and len(got) > 1:
                raise QueryError(param, "given more than once")
            value = values.get(param)
            if value not in (None, ""):
                data[fieldname] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["loc"]:
                field = str(err["loc"][0])
                message = err["msg"].removeprefix("Value error, ")
            else:  # a cross-field check names its field first
                field, _, message = err["msg"].removeprefix("Value error, ").partition(": ")
            param = next((p for p, f in names.items() if f == field), field)
            raise QueryError(param, message) from None

    def filters(self) -> dict[str, str]:
        """The filters as query-string parameters (links and hidden fields keep them)."""
        out = {}
        for param in FILTER_PARAMS:
            value = getattr(self, PARAMS[param])
            if value is not None:
                out[param] = f"{value:g}" if isinstance(value, float) else str(value)
        return out

    def matches(self, s: Summary) -> bool:
        if self.model is not None and s.model != self.model:
            return False
        if self.model_version is not None and s.model_version != self.model_version:
            return False
        if self.feature is not None and s.top_feature != self.feature:
            return False
        if self.search is not None and not (
            self.search in s.request_id or self.search in s.client_request_id
        ):
            return False
        if self.min_score is not None or self.max_score is not None:
            if s.top_score is None:
                return False
            if self.min_score is not None and s.top_score < self.min_score:
                return False
            if self.max_score is not None and s.top_score > self.max_score:
                return False
        if self.since is not None or self.until is not None:
            if s.finished_at is None:
                return False
            if self.since is not None and s.finished_at < self.since:
                return False
            if self.until is not None and s.finished_at > self.until:
                return False
        return True


class Page(BaseModel):
    rows: list[Summary]
    matching: int  # rows matching the filters in the whole queue
    before: int  # matching rows before this page
    next_after: str | None  # the cursor of the next page; None on the last


def page(rows: list[Summary], query: QueueQuery, default_limit: int | None = None) -> Page:
    """One page of the matching rows (oldest first) after ``query.after``."""
    shown = [r for r in rows if query.matches(r)]
    start = 0
    if query.after is not None:
        cursor = entry_key(query.after)
        start = next((i for i, r in enumerate(shown) if entry_key(r.id) > cursor), len(shown))
    limit = query.limit or default_limit or len(shown) or 1
    chunk = shown[start : start + limit]
    more = start + limit < len(shown)
    return Page(
        rows=chunk,
        matching=len(shown),
        before=start,
        next_after=chunk[-1].id if more and chunk else None,
    )
