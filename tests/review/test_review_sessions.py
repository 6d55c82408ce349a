"""Review sessions live in Redis: two real review pages on one real Redis share them, a restart
keeps them, and a logout revokes them on every replica."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.review_settings import ReviewSettings
from tests.support.redis_proc import RedisProc
from tests.support.review_data import push_flagged, tiny_tokenizer
from tests.support.review_pages import (
    PASSWORDS,
    Page,
    client,
    cookie_of,
    csrf_in,
    log_in,
    start_page,
    users,
)

TTL_S = 3600


@dataclass
class Replicas:
    redis: RedisProc
    start: Callable[[], Awaitable[Page]]

    def session_keys(self) -> list[str]:
        return sorted(self.redis.client().scan_iter("misalign:review:sess:*"))


@pytest.fixture
async def replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Replicas]:
    """One Redis holding one flagged sample; ``start()`` starts another review page on it."""
    redis = RedisProc(tmp_path / "r", persist=False).start()
    pages: list[Page] = []
    settings = ReviewSettings(port=0, users=users(tmp_path, monkeypatch), session_ttl_s=TTL_S)

    async def start() -> Page:
        pages.append(await start_page(redis.url, settings))
        return pages[-1]

    try:
        await push_flagged(redis.url, tiny_tokenizer(tmp_path / "tokenizer.json"), 1)
        yield Replicas(redis, start)
    finally:
        for page in pages:
            await page.stop()
        redis.stop()


async def test_two_replicas_share_a_session_and_its_csrf_token(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    [row] = await a.store.queue()
    async with client() as http:
        r = await log_in(http, a.url, "alice", PASSWORDS["alice"])
        assert r.status == 303
        alice = cookie_of(r)
        page_a = await (await http.get(a.url + "/", headers=alice)).text()
        r = await http.get(b.url + "/", headers=alice, allow_redirects=False)
        assert r.status == 200
        page_b = await r.text()
        assert "alice" in page_b and csrf_in(page_b) == csrf_in(page_a)
        # A form from replica a, posted to replica b: the CSRF token is the session's, not a's.
        r = await http.post(
            f"{b.url}/samples/{row.id}/claim",
            data={"csrf": csrf_in(page_a)},
            headers=alice,
            allow_redirects=False,
        )
        assert r.status == 303
        [claimed] = await b.store.queue()
        assert claimed.claim is not None and claimed.claim.owner == "alice"
        # Another user's session on the other replica is a session of its own.
        r = await log_in(http, b.url, "bob", PASSWORDS["bob"])
        bob = cookie_of(r)
        page = await (await http.get(a.url + "/", headers=bob)).text()
        assert csrf_in(page) != csrf_in(page_a)
    # Redis holds each session under the digest of its id, never the id a cookie carries.
    keys = replicas.session_keys()
    assert len(keys) == 2
    ids = [c["Cookie"].split("=", 1)[1] for c in (alice, bob)]
    assert keys == sorted(
        f"misalign:review:sess:{hashlib.sha256(i.encode()).hexdigest()}" for i in ids
    )
    r0 = replicas.redis.client()
    for key in keys:
        assert 0 < r0.pttl(key) <= TTL_S * 1000
        assert not any(i in r0.get(key) for i in ids)
        assert json.loads(r0.get(key))["user"] in ("alice", "bob")


async def test_a_restart_keeps_sessions(replicas: Replicas) -> None:
    page = await replicas.start()
    async with client() as http:
        r = await log_in(http, page.url, "alice", PASSWORDS["alice"])
        alice = cookie_of(r)
        csrf = csrf_in(await (await http.get(page.url + "/", headers=alice)).text())
        await page.stop()
        page = await replicas.start()  # a new app, a new Redis client: all a restart keeps is Redis
        r = await http.get(page.url + "/", headers=alice, allow_redirects=False)
        assert r.status == 200 and csrf_in(await r.text()) == csrf
        r = await http.post(
            page.url + "/next", data={"csrf": csrf}, headers=alice, allow_redirects=False
        )
        assert r.status == 303 and r.headers["Location"].startswith("/samples/")


async def test_logout_revokes_the_session_on_every_replica(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    async with client() as http:
        alice = cookie_of(await log_in(http, a.url, "alice", PASSWORDS["alice"]))
        bob = cookie_of(await log_in(http, a.url, "bob", PASSWORDS["bob"]))
        csrf = csrf_in(await (await http.get(a.url + "/", headers=alice)).text())
        r = await http.post(
            b.url + "/logout", data={"csrf": csrf}, headers=alice, allow_redirects=False
        )
        assert r.status == 303 and r.headers["Location"] == "/login"
        # The cookie replayed after the logout, on either replica, with its CSRF token.
        for page in (a, b):
            r = await http.get(page.url + "/", headers=alice, allow_redirects=False)
            assert r.status == 303 and r.headers["Location"].startswith("/login?next=")
            r = await http.post(
                page.url + "/next", data={"csrf": csrf}, headers=alice, allow_redirects=False
            )
            assert (r.status, await r.text()) == (401, "login required")
        [row] = await a.store.queue()
        assert row.claim is not None and row.claim.unclaimed  # the replayed /next claimed nothing
        # bob's session is untouched; alice's is gone from Redis.
        assert (await http.get(b.url + "/", headers=bob, allow_redirects=False)).status == 200
        assert len(replicas.session_keys()) == 1
