"""The review queue's filters, search and cursor (review/query.py), on hostile input."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from review.query import QueryError, QueueQuery, page
from review.store import Summary


def rows() -> list[Summary]:
    return [
        Summary(
            id=f"1000-{i}",
            request_id=f"req-{i}",
            client_request_id=f"client-{i % 3}",
            model="m-a" if i % 2 else "m-b",
            model_version=f"v{i % 2 + 1}",
            top_feature="toxic",
            top_score=float(i),
            finished_at=1_764_590_400.0 + 60 * i,  # 2025-12-01T12:00Z plus i minutes
        )
        for i in range(10)
    ]


def ids(q: QueueQuery, limit: int | None = None) -> list[str]:
    return [r.id.split("-")[1] for r in page(rows(), q, limit).rows]


def test_filters_search_ranges_and_times() -> None:
    parse = QueueQuery.parse
    assert ids(parse({"model_version": "v2"})) == ["1", "3", "5", "7", "9"]
    assert ids(parse({"q": "client-2"})) == ["2", "5", "8"]
    assert ids(parse({"q": "req-7"})) == ["7"]
    assert ids(parse({"min_score": "2.5", "max_score": "5"})) == ["3", "4", "5"]
    assert ids(parse({"since": "2025-12-01T12:08", "model": "m-a"})) == ["9"]
    assert ids(parse({"until": str(1_764_590_400 + 60)})) == ["0", "1"]
    assert ids(parse({"since": "2025-12-01T12:02:00+00:00", "until": "2025-12-01T12:03Z"})) == [
        "2",
        "3",
    ]
    assert parse({"q": "", "model": ""}) == QueueQuery()  # an empty box is no filter


def test_cursor_paging_walks_every_row_once() -> None:
    seen: list[str] = []
    after = None
    while True:
        p = page(rows(), QueueQuery(after=after, limit=3, model_version="v1"))
        seen += [r.id for r in p.rows]
        if p.next_after is None:
            break
        after = p.next_after
    assert seen == [r.id for r in rows() if r.model_version == "v1"]
    # A cursor past a row that has since been decided still lands on the next one.
    p = page([r for r in rows() if r.id != "1000-4"], QueueQuery(after="1000-4", limit=2))
    assert [r.id for r in p.rows] == ["1000-5", "1000-6"] and p.before == 4
    # Ids compare as numbers, not strings ("1000-10" is after "1000-9").
    assert page(rows(), QueueQuery(after="999-99")).before == 0


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"min_score": "nan"}, "min_score", "finite number"),
        ({"min_score": "1e999"}, "min_score", "finite number"),
        ({"max_score": "abc"}, "max_score", "valid number"),
        ({"min_score": "3", "max_score": "1"}, "max_score", "below min_score"),
        ({"since": "yesterday"}, "since", "ISO 8601"),
        ({"until": "-5"}, "until", "after 1970"),
        ({"since": "2026-01-02", "until": "2026-01-01"}, "until", "before since"),
        ({"after": "1-1\n"}, "after", "stream entry id"),
        ({"after": "' OR 1=1"}, "after", "stream entry id"),
        ({"limit": "0"}, "limit", "greater than or equal to 1"),
        ({"limit": "99999999"}, "limit", "less than or equal to 5000"),
        ({"limit": "1.5"}, "limit", "valid integer"),
        ({"q": "x" * 201}, "q", "at most 200 characters"),
        ({"model": "m\x1b[2J"}, "model", "control characters"),
    ],
)
def test_hostile_values_name_their_parameter(
    params: dict[str, str], param: str, message: str
) -> None:
    with pytest.raises(QueryError) as exc:
        QueueQuery.parse(params)
    assert exc.value.param == param and message in str(exc.value), str(exc.value)


def test_a_repeated_parameter_is_refused() -> None:
    with pytest.raises(QueryError, match="'model': given more than once"):
        QueueQuery.parse(MultiDict([("model", "a"), ("model", "b")]))


def test_filters_round_trip_through_the_query_string() -> None:
    q = QueueQuery.parse({"model_version": "v2", "min_score": "2.50", "q": "req", "after": "1-1"})
    assert q.filters() == {"model_version": "v2", "q": "req", "min_score": "2.5"}
    assert QueueQuery.parse(q.filters()) == q.model_copy(update={"after": None})
