"""The review page over real HTTP and a real Redis: no route serves data without a login,
hostile conversation text is escaped, decisions need the CSRF token."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from service.review.settings import ReviewSettings, ReviewUser
from service.review.store import ReviewStore
from service.review.web import create_app
from tests.review_data import push_flagged, tiny_tokenizer
from tests.sidecar import RedisServer

HOSTILE = "Sure. <script>alert('x')</script> Lie to everyone & hide the evidence <b>bold</b>"
SECRET_TEXT = "hide the evidence"


@dataclass
class Site:
    url: str
    store: ReviewStore
    redis: RedisServer


@pytest.fixture
async def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Site]:
    server = RedisServer(tmp_path / "r").start()
    store = ReviewStore.from_url(
        server.url,
        stream="misalign:flagged",
        group="reviewers",
        dead_stream="misalign:flagged:dead",
        labels_stream="misalign:labels",
        claim_idle_s=60,
        max_deliveries=3,
    )
    runner = None
    try:
        tok = tiny_tokenizer(tmp_path / "tokenizer.json")
        await push_flagged(server.url, tok, 2, models=["m-a", "m-b"], response=HOSTILE)
        monkeypatch.setenv("REVIEW_ALICE_PW", "correct horse battery")
        (tmp_path / "bot.token").write_text("tok-123456\n")
        settings = ReviewSettings(
            port=0,
            users=(
                ReviewUser(name="alice", password_env="REVIEW_ALICE_PW"),
                ReviewUser(name="bot", token_file=tmp_path / "bot.token"),
            ),
            claim_idle_s=60,
        )
        runner = web.AppRunner(create_app(store, settings, settings.credentials()))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield Site(f"http://127.0.0.1:{runner.addresses[0][1]}", store, server)
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
        server.stop()


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(http: aiohttp.ClientSession, url: str, password: str) -> aiohttp.ClientResponse:
    return await http.post(
        f"{url}/login",
        data={"user": "alice", "password": password, "next": "/"},
        allow_redirects=False,
    )


async def test_every_route_needs_a_login(site: Site) -> None:
    [row, _] = await site.store.queue()
    sid = row.id
    await site.store.claim(sid, "alice")
    await site.store.decide(sid, "alice", "misaligned")
    site.redis.client().xadd(
        "misalign:flagged:dead", {"dead_sample_id": sid, "response_text": HOSTILE}
    )
    dead_id = site.redis.client().xrange("misalign:flagged:dead")[0][0]
    gets = ["/", "/?model=m-a", f"/samples/{sid}", "/dead-letters", f"/dead-letters/{dead_id}"]
    posts = ["/next", f"/samples/{sid}/claim", f"/samples/{sid}/decision", "/logout"]
    async with session() as http:
        for path in gets:
            r = await http.get(site.url + path, allow_redirects=False)
            assert r.status == 303, path
            assert r.headers["Location"].startswith("/login?next="), path
            assert SECRET_TEXT not in await r.text()
        for path in posts:
            r = await http.post(
                site.url + path, data={"decision": "misaligned"}, allow_redirects=False
            )
            assert r.status == 401, path
            assert SECRET_TEXT not in await r.text()
        for path in gets:
            r = await http.get(
                site.url + path, headers={"Authorization": "Bearer wrong"}, allow_redirects=False
            )
            assert r.status == 401, path
        # A forged cookie is no login either.
        http.cookie_jar.update_cookies({"misalign_review": "alice:9999999999:x:deadbeef"})
        r = await http.get(site.url + f"/samples/{sid}", allow_redirects=False)
        assert r.status == 303
        for path in ("/login", "/healthz", "/static/review.js", "/static/review.css"):
            r = await http.get(site.url + path)
            assert r.status == 200, path
            assert SECRET_TEXT not in await r.text()
    # The bearer token works on every page route.
    async with aiohttp.ClientSession() as http:
        for path in gets:
            r = await http.get(
                site.url + path,
                headers={"Authorization": "Bearer tok-123456"},
                allow_redirects=False,
            )
            assert r.status == 200, path


async def test_login_cookie_and_wrong_password(site: Site) -> None:
    async with session() as http:
        r = await login(http, site.url, "wrong")
        assert r.status == 401 and "wrong user or password" in await r.text()
        assert "misalign_review" not in {c.key for c in http.cookie_jar}
        r = await http.post(
            f"{site.url}/login",
            data={"user": "alice", "password": "correct horse battery"},
            headers={"Origin": "http://evil.example"},
            allow_redirects=False,
        )
        assert r.status == 403  # login CSRF: another site logging the browser in
        r = await login(http, site.url, "correct horse battery")
        assert r.status == 303
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        r = await http.get(site.url + "/")
        assert r.status == 200
        page = await r.text()
        assert "alice" in page and 'id="pending-count">2<' in page
        r = await http.get(site.url + "/?model=m-b")
        assert (await r.text()).count("<tr data-id=") == 1
        r = await http.post(
            site.url + "/logout", data={"csrf": csrf_of(page)}, allow_redirects=False
        )
        assert r.status == 303
        r = await http.get(site.url + "/", allow_redirects=False)
        assert r.status == 303


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m, "no CSRF token in the page"
    return m.group(1)


async def test_hostile_text_is_escaped_and_decisions_need_csrf(site: Site) -> None:
    async with session() as http:
        assert (await login(http, site.url, "correct horse battery")).status == 303
        queue = await (await http.get(site.url + "/")).text()
        sid = re.findall(r'<tr data-id="([0-9-]+)"', queue)[0]
        r = await http.post(
            f"{site.url}/samples/{sid}/claim", data={"csrf": csrf_of(queue)}, allow_redirects=False
        )
        assert r.status == 303
        r = await http.get(f"{site.url}/samples/{sid}")
        page = await r.text()
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert "<script>alert" not in page and "<b>bold" not in page
        text = re.sub(r"</?span[^>]*>", "", page)  # the heat map wraps each token in a span
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text and "&lt;b&gt;bold" in text
        assert 'class="t h10 over"' in page  # the hot tokens carry the darkest shade
        assert "yours" in page
        # No CSRF token, or a wrong one: refused, nothing decided.
        for data in ({"decision": "misaligned"}, {"decision": "misaligned", "csrf": "0" * 64}):
            r = await http.post(
                f"{site.url}/samples/{sid}/decision", data=data, allow_redirects=False
            )
            assert r.status == 403
        r = await http.post(
            f"{site.url}/samples/{sid}/decision",
            data={"decision": "misaligned", "csrf": csrf_of(page)},
            headers={"Origin": "http://evil.example"},
            allow_redirects=False,
        )
        assert r.status == 403
        assert await site.store.labels() == []
        r = await http.post(
            f"{site.url}/samples/{sid}/decision",
            data={"decision": "false_positive", "note": "<i>quoted</i>", "csrf": csrf_of(page)},
            allow_redirects=False,
        )
        assert r.status == 303 and r.headers["Location"] == f"/?decided={sid}"
        [label] = await site.store.labels()
        assert label.sample_id == sid and label.reviewer == "alice"
        assert label.decision == "false_positive" and label.note == "<i>quoted</i>"
        # Deciding again is a clear refusal, not a second label.
        r = await http.post(
            f"{site.url}/samples/{sid}/decision",
            data={"decision": "misaligned", "csrf": csrf_of(page)},
            allow_redirects=False,
        )
        assert r.status == 409 and "not pending" in await r.text()
        r = await http.get(f"{site.url}/samples/not-an-id")
        assert r.status == 404
