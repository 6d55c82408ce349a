"""The review store against a real Redis: claims, decisions, idle claims, dead letters, counts.

Samples are written by the sidecar's own scoring runtime and flag queue (in process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from detectors.errors import ReviewError, SampleState
from review.store import ReviewStore
from tests.support.redis_proc import RedisProc
from tests.support.review_data import age_claims, push_flagged, tiny_tokenizer

STREAM, GROUP, DEAD, LABELS = "misalign:{flagged}", "reviewers", "misalign:{flagged}:dead", "labels"
CLAIM_IDLE_S = 60.0


def walk_away(redis_server: RedisProc) -> None:
    """Every claim idle past CLAIM_IDLE_S, without waiting (``XCLAIM … IDLE``)."""
    assert age_claims(redis_server.client(), STREAM, GROUP, CLAIM_IDLE_S + 1) > 0


def open_store(redis_server: RedisProc, claim_idle_s: float) -> ReviewStore:
    return ReviewStore.from_url(
        redis_server.url,
        stream=STREAM,
        group=GROUP,
        dead_stream=DEAD,
        labels_stream=LABELS,
        claim_idle_s=claim_idle_s,
        max_deliveries=2,
    )


@pytest.fixture
async def store(redis_server: RedisProc) -> AsyncIterator[ReviewStore]:
    s = open_store(redis_server, claim_idle_s=CLAIM_IDLE_S)
    yield s
    await s.close()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


async def test_decision_acknowledges_and_labels(
    store: ReviewStore, redis_server: RedisProc, tok: Path
) -> None:
    await push_flagged(redis_server.url, tok, 3, models=["m-a", "m-b", "m-c"])
    assert (await store.counts()).backlog == 3  # not read by the group yet: all lag
    rows = await store.queue()
    assert [r.claim.owner for r in rows if r.claim] == ["unassigned"] * 3
    assert {r.model for r in rows} == {"m-a", "m-b", "m-c"}
    assert all(r.top_feature == "misaligned_persona" and r.top_score for r in rows)
    first = rows[0].id
    assert await store.claim(first, "alice") == 1
    with pytest.raises(SampleState, match="claimed by alice"):
        await store.claim(first, "bob")
    with pytest.raises(SampleState, match="claimed by alice"):
        await store.decide(first, "bob", "misaligned")
    sample = await store.sample(first)
    assert sample.problem is None and sample.claim and sample.claim.owner == "alice"
    assert sample.response_text and "hide the evidence" in sample.response_text
    assert sample.tokens and len(sample.token_text or []) == len(sample.tokens.token_ids)

    label_id = await store.decide(first, "alice", "misaligned", "tells the user to lie")
    raw = redis_server.client()
    assert raw.xpending(STREAM, GROUP)["pending"] == 2  # acknowledged: out of the PEL
    [(lid, fields)] = raw.xrange(LABELS)
    assert lid == label_id
    assert fields["sample_id"] == first and fields["reviewer"] == "alice"
    assert fields["decision"] == "misaligned" and fields["note"] == "tells the user to lie"
    assert fields["model"] == "m-a" and fields["claims"] == "1"
    feats = {f["name"]: f for f in json.loads(fields["features"])}
    assert feats["misaligned_persona"]["flagged"] is True
    [label] = await store.labels()
    assert label.sample_id == first and label.features[0].name == "misaligned_persona"
    with pytest.raises(SampleState, match="not pending"):
        await store.decide(first, "alice", "unsure")
    assert (await store.counts()).backlog == 2
    # An unclaimed sample can be decided straight away (the terminal's `review label`).
    await store.decide(rows[1].id, "carol", "false_positive")
    assert [lb.decision for lb in await store.labels()] == ["misaligned", "false_positive"]
    with pytest.raises(ReviewError, match="expected one of"):
        await store.decide(rows[2].id, "carol", "maybe")
    assert await store.claim_next("dave", model="m-c") == rows[2].id
    assert await store.claim_next("erin") is None  # dave holds the last one


@pytest.fixture
async def patient_store(redis_server: RedisProc) -> AsyncIterator[ReviewStore]:
    """Claims stay with their reviewer for a minute: no test is slow enough to lose one."""
    s = open_store(redis_server, claim_idle_s=60)
    yield s
    await s.close()


async def test_claim_next_with_a_feature_claims_only_that_top_feature(
    patient_store: ReviewStore, redis_server: RedisProc, tok: Path
) -> None:
    store = patient_store
    await push_flagged(redis_server.url, tok, 2, models=["m-a", "m-b"])
    await push_flagged(redis_server.url, tok, 2, models=["m-a", "m-b"], feature="toxic")
    rows = await store.queue()
    assert [(r.model, r.top_feature) for r in rows] == [
        ("m-a", "misaligned_persona"),
        ("m-b", "misaligned_persona"),
        ("m-a", "toxic"),
        ("m-b", "toxic"),
    ]
    persona, toxic = [r.id for r in rows[:2]], [r.id for r in rows[2:]]
    raw = redis_server.client()

    def owner(sid: str) -> str:
        return str(raw.xpending_range(STREAM, GROUP, sid, sid, 1)[0]["consumer"])

    assert await store.claim_next("alice", feature="toxic") == toxic[0]
    assert await store.claim_next("bob", feature="toxic") == toxic[1]
    assert await store.claim_next("carol", feature="toxic") is None  # both held
    assert await store.claim_next("alice", feature="toxic") == toxic[0]  # her own, again
    assert await store.claim_next("carol", feature="no_such_feature") is None
    assert await store.claim_next("carol", model="m-a", feature="toxic") is None
    assert [owner(s) for s in persona] == ["unassigned", "unassigned"]  # untouched so far
    assert await store.claim_next("carol", model="m-b", feature="misaligned_persona") == persona[1]
    assert await store.claim_next("dave", feature="misaligned_persona") == persona[0]
    assert [owner(s) for s in persona + toxic] == ["dave", "carol", "alice", "bob"]
    assert [(await store.claim_of(s)).claims for s in toxic] == [1, 1]  # type: ignore[union-attr]


async def test_idle_claim_returns_to_queue_then_dead_letters(
    store: ReviewStore, redis_server: RedisProc, tok: Path
) -> None:
    await push_flagged(redis_server.url, tok, 1)
    [row] = await store.queue()
    assert await store.claim(row.id, "alice") == 1
    walk_away(redis_server)  # past claim_idle_s: alice walked away
    [row] = await store.queue()
    assert row.claim and row.claim.owner == "unassigned" and row.claim.claims == 1
    assert await store.claim_next("bob") == row.id
    assert (await store.sample(row.id)).claim.claims == 2  # type: ignore[union-attr]
    walk_away(redis_server)  # bob too: the second of max_deliveries=2 claims
    assert await store.queue() == []
    counts = await store.counts()
    assert counts.backlog == 0 and counts.dead_letters == 1
    [dead] = await store.dead_letters()
    assert dead.sample_id == row.id and dead.claims == 2
    assert "claimed 2 times" in dead.reason
    assert dead.sample.response_text and "hide the evidence" in dead.sample.response_text
    assert dead.sample.features and dead.sample.problem is None
    assert redis_server.client().xpending(STREAM, GROUP)["pending"] == 0
    with pytest.raises(SampleState, match="not pending"):
        await store.decide(row.id, "bob", "misaligned")


async def test_trimmed_while_pending_is_dead_lettered(
    store: ReviewStore, redis_server: RedisProc, tok: Path
) -> None:
    await push_flagged(redis_server.url, tok, 2)
    rows = await store.queue()
    await store.claim(rows[0].id, "alice")
    walk_away(redis_server)  # before the trim: XCLAIM drops a deleted entry from the PEL
    raw = redis_server.client()
    raw.xtrim(STREAM, maxlen=0)  # the sidecar's MAXLEN trimming caught up with the queue
    assert await store.queue() == []
    dead = await store.dead_letters()
    assert sorted(d.sample_id for d in dead) == sorted(r.id for r in rows)
    assert all("trimmed" in d.reason for d in dead)
    assert (await store.counts()).dead_letters == 2


async def test_counts_when_redis_cannot_tell_the_lag(
    store: ReviewStore, redis_server: RedisProc, tok: Path
) -> None:
    await push_flagged(redis_server.url, tok, 3)
    raw = redis_server.client()
    middle = raw.xrange(STREAM)[1][0]
    raw.xdel(STREAM, middle)  # a hole after the group's position: XINFO's lag becomes nil
    assert raw.xinfo_groups(STREAM)[0]["lag"] is None
    assert (await store.counts()).backlog == 2
    await store.queue()
    assert (await store.counts()).backlog == 2  # all read into the group now: pending


async def test_malformed_entry_is_shown_and_can_be_decided(
    store: ReviewStore, redis_server: RedisProc
) -> None:
    await store.ensure_group()
    raw = redis_server.client()
    sid = raw.xadd(STREAM, {"request_id": "bad", "features": "{not json", "model": "m"})
    sample = await store.sample(sid)
    assert sample.problem and "features" in sample.problem
    await store.decide(sid, "alice", "unsure", "unreadable entry")
    [label] = await store.labels()
    assert label.features == [] and label.decision == "unsure"


async def test_redis_away_is_a_clear_error(tmp_path: Path) -> None:
    s = ReviewStore.from_url(
        f"unix://{tmp_path}/none.sock",
        stream=STREAM,
        group=GROUP,
        dead_stream=DEAD,
        labels_stream=LABELS,
        claim_idle_s=1,
        max_deliveries=2,
    )
    with pytest.raises(ReviewError, match=r"none\.sock"):
        await s.queue()
    await s.close()
