"""The review page over real HTTP and a real Redis: no route serves data without a login,
hostile conversation text is escaped, decisions need the CSRF token."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from review.store import ReviewStore
from review.web import COOKIE, create_app
from service.review_settings import ReviewSettings, ReviewUser
from tests.support.redis_proc import RedisProc
from tests.support.review_data import age_claims, push_flagged, tiny_tokenizer
from tests.support.review_pages import Clock

HOSTILE = "Sure. <script>alert('x')</script> Lie to everyone & hide the evidence <b>bold</b>"
SECRET_TEXT = "hide the evidence"
PASSWORD = "correct horse battery"
STREAM, GROUP, DEAD = "misalign:{flagged}", "reviewers", "misalign:{flagged}:dead"
SESSION_TTL_S = 12 * 3600.0


@dataclass
class Site:
    url: str
    store: ReviewStore
    redis: RedisProc
    tok: Path
    clock: Clock

    def age_claims(self) -> None:
        """Every claim idle past ``claim_idle_s`` (as if the reviewer walked away)."""
        assert (
            age_claims(self.redis.client(), STREAM, GROUP, self.store.claim_idle_ms / 1000 + 1) > 0
        )

    def owner(self, sample_id: str) -> tuple[str, int]:
        """Who holds the sample in the reviewers' group, and its delivery count (Redis's own)."""
        [p] = self.redis.client().xpending_range(STREAM, GROUP, sample_id, sample_id, 1)
        return p["consumer"], p["times_delivered"]


@pytest.fixture
async def site(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Site]:
    """Two flagged samples (models m-a, m-b; top feature misaligned_persona) and the page with
    users alice (password) and bot (token). ``request.param`` (indirect parametrization) may set
    ``claim_idle_s``, ``max_deliveries`` and ``session_ttl_s``."""
    opts: dict[str, Any] = {"claim_idle_s": 60, "max_deliveries": 3, "session_ttl_s": SESSION_TTL_S}
    opts.update(getattr(request, "param", {}))
    server = RedisProc(tmp_path / "r", persist=False).start()
    store = ReviewStore.from_url(
        server.url,
        stream=STREAM,
        group=GROUP,
        dead_stream=DEAD,
        labels_stream="misalign:{flagged}:labels",
        claim_idle_s=opts["claim_idle_s"],
        max_deliveries=opts["max_deliveries"],
    )
    runner = None
    try:
        tok = tiny_tokenizer(tmp_path / "tokenizer.json")
        await push_flagged(server.url, tok, 2, models=["m-a", "m-b"], response=HOSTILE)
        monkeypatch.setenv("REVIEW_ALICE_PW", PASSWORD)
        (tmp_path / "bot.token").write_text("tok-123456\n")
        settings = ReviewSettings(
            port=0,
            users=(
                ReviewUser(name="alice", password_env="REVIEW_ALICE_PW"),
                ReviewUser(name="bot", token_file=tmp_path / "bot.token"),
            ),
            claim_idle_s=opts["claim_idle_s"],
            max_deliveries=opts["max_deliveries"],
            session_ttl_s=opts["session_ttl_s"],
        )
        clock = Clock()
        runner = web.AppRunner(create_app(store, settings, settings.credentials(), clock=clock))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield Site(f"http://127.0.0.1:{runner.addresses[0][1]}", store, server, tok, clock)
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


async def raw_status(url: str, head: bytes) -> int:
    """The status of a request sent as raw bytes (headers aiohttp's client will not send)."""
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    writer.write(head + b"Host: " + where.netloc.encode() + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status = (await reader.readline()).split()[1]
    writer.close()
    return int(status)


def forged_cookies(real: str) -> dict[str, str]:
    """Cookies that must not log anyone in, from a real one (a random session id)."""
    other = "A" if real[-1] != "A" else "B"
    payload = "alice:9999999999:x"
    return {
        "unknown id of the same shape": secrets.token_urlsafe(32),
        "one character changed": real[:-1] + other,
        "cut short": real[:-1],
        "one character more": real + other,
        "non-ascii id": "é" * 43,
        "the id's digest, as Redis holds it": hashlib.sha256(real.encode()).hexdigest(),
        "a signed cookie of the old format": f"{payload}:"
        + hmac.new(secrets.token_bytes(32), payload.encode(), hashlib.sha256).hexdigest(),
    }


async def test_every_route_needs_a_login(site: Site) -> None:
    [row, other] = await site.store.queue()
    sid = row.id
    await site.store.claim(sid, "alice")
    await site.store.decide(sid, "alice", "misaligned")
    site.redis.client().xadd(DEAD, {"dead_sample_id": sid, "response_text": HOSTILE})
    dead_id = site.redis.client().xrange(DEAD)[0][0]
    gets = ["/", "/?model=m-a", f"/samples/{sid}", "/dead-letters", f"/dead-letters/{dead_id}"]
    # Posts on the pending sample: one let through would claim or decide it.
    posts = ["/next", f"/samples/{other.id}/claim", f"/samples/{other.id}/decision", "/logout"]

    async def refused(
        http: aiohttp.ClientSession,
        what: str,
        headers: dict[str, str],
        get_status: int,
        form: dict[str, str],
        text: str,
    ) -> None:
        for path in gets:
            r = await http.get(site.url + path, headers=headers, allow_redirects=False)
            assert r.status == get_status, (what, path)
            if get_status == 303:
                assert r.headers["Location"].startswith("/login?next="), (what, path)
            assert SECRET_TEXT not in await r.text(), (what, path)
        for path in posts:
            r = await http.post(
                site.url + path,
                data={"decision": "misaligned", **form},
                headers=headers,
                allow_redirects=False,
            )
            body = await r.text()
            assert (r.status, body) == (401, text), (what, path)

    async with session() as http:
        # A real session first, so that its cookie and CSRF token can be replayed when expired.
        assert (await login(http, site.url, PASSWORD)).status == 303
        real = http.cookie_jar.filter_cookies(URL(site.url))[COOKIE].value
        r = await http.get(site.url + "/", allow_redirects=False)
        assert r.status == 200  # the cookie works while fresh
        csrf = {"csrf": csrf_of(await r.text())}
    async with session() as http:
        await refused(http, "no login", {}, 303, {}, "login required")
        for token in ("wrong", "tok-12345", "tok-1234567", "TOK-123456"):
            bearer = {"Authorization": f"Bearer {token}"}
            await refused(http, f"bearer {token!r}", bearer, 401, {}, "invalid token")
        for what, cookie in forged_cookies(real).items():
            cookie_header = {"Cookie": f"{COOKIE}={cookie}"}
            await refused(http, what, cookie_header, 303, csrf, "login required")
        for path in ("/login", "/healthz", "/static/review.js", "/static/review.css"):
            r = await http.get(site.url + path)
            assert r.status == 200, path
            assert SECRET_TEXT not in await r.text()
        # Bytes that are not UTF-8 in the token or the cookie: refused, not a server error.
        for head in (
            b"GET / HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n",
            b"POST /next HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\nContent-Length: 0\r\n",
        ):
            assert await raw_status(site.url, head) == 401, head
        cookie = COOKIE.encode() + b"=alice:9999999999:x:\xff\xfe"
        assert await raw_status(site.url, b"GET / HTTP/1.1\r\nCookie: " + cookie + b"\r\n") == 303
        # The real cookie once its lifetime is over on the page's clock, with the session's own
        # CSRF token (Redis still holds the record: its TTL is 12 h of real time).
        site.clock.now += SESSION_TTL_S + 1
        assert site.redis.client().keys("misalign:review:sess:*")
        await refused(http, "expired", {"Cookie": f"{COOKIE}={real}"}, 303, csrf, "login required")
    # Nothing got through: the pending sample is still unclaimed, the one label is the setup's.
    assert site.owner(other.id) == ("unassigned", 1)
    assert [lb.sample_id for lb in await site.store.labels()] == [sid]
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
        r = await login(http, site.url, PASSWORD)
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
        assert (await login(http, site.url, PASSWORD)).status == 303
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
        for data in (
            {"decision": "misaligned"},
            {"decision": "misaligned", "csrf": "0" * 64},
            {"decision": "misaligned", "csrf": "é" * 64},  # non-ASCII: refused, not a 500
        ):
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
        r = await http.get(f"{site.url}/samples/{sid}%0A")  # "$" would let the newline through
        assert r.status == 404


def queue_ids(page: str) -> list[str]:
    return re.findall(r'<tr data-id="([0-9-]+)"', page)


async def push_toxic(site: Site) -> list[str]:
    """Two more samples, top feature toxic (models m-a, m-b); their ids, oldest first."""
    await push_flagged(
        site.redis.url, site.tok, 2, models=["m-a", "m-b"], response=HOSTILE, feature="toxic"
    )
    rows = await site.store.queue()
    return [r.id for r in rows if r.top_feature == "toxic"]


async def test_feature_filter_shows_only_samples_with_that_top_feature(site: Site) -> None:
    toxic = await push_toxic(site)
    rows = await site.store.queue()
    persona = [r.id for r in rows if r.top_feature == "misaligned_persona"]
    assert len(toxic) == 2 and len(persona) == 2 and len(rows) == 4
    async with session() as http:
        assert (await login(http, site.url, PASSWORD)).status == 303
        page = await (await http.get(site.url + "/")).text()
        assert queue_ids(page) == [r.id for r in rows]
        assert ">misaligned_persona (2)</a>" in page and ">toxic (2)</a>" in page
        assert "4 matches" in page

        page = await (await http.get(site.url + "/?feature=toxic")).text()
        assert queue_ids(page) == toxic
        assert 'id="pending-count">4<' in page  # the count is of the whole queue
        assert "2 matches" in page and "Review next (filtered)" in page
        assert '<input type="hidden" name="feature" value="toxic">' in page  # for "Review next"
        assert 'href="/?feature=toxic" class="on">toxic (2)</a>' in page
        # The facets still count the whole queue, so the other feature stays one click away.
        assert 'href="/?feature=misaligned_persona" class="">misaligned_persona (2)</a>' in page

        page = await (await http.get(site.url + "/?feature=toxic&model=m-b")).text()
        assert queue_ids(page) == [toxic[1]] and "1 match<" in page

        page = await (await http.get(site.url + "/?feature=misaligned_persona")).text()
        assert queue_ids(page) == persona

        page = await (await http.get(site.url + "/?feature=no_such_feature")).text()
        assert queue_ids(page) == [] and "0 matches" in page
        assert "No pending samples with these filters." in page


async def test_review_next_claims_the_oldest_matching_sample_for_the_reviewer(site: Site) -> None:
    persona = [r.id for r in await site.store.queue()]  # models m-a, m-b
    toxic = await push_toxic(site)  # models m-a, m-b
    async with session() as http:
        assert (await login(http, site.url, PASSWORD)).status == 303
        csrf = csrf_of(await (await http.get(site.url + "/")).text())

        async def next_(**filters: str) -> str:
            r = await http.post(
                site.url + "/next", data={"csrf": csrf, **filters}, allow_redirects=False
            )
            assert r.status == 303, await r.text()
            return r.headers["Location"]

        # No filters: the oldest sample in the queue, now alice's in Redis's pending list.
        assert await next_() == f"/samples/{persona[0]}"
        assert site.owner(persona[0]) == ("alice", 2)
        # A feature filter skips alice's own sample of the other feature.
        assert await next_(feature="toxic") == f"/samples/{toxic[0]}?feature=toxic"
        assert site.owner(toxic[0]) == ("alice", 2)
        assert await next_(model="m-b", feature="toxic") == (
            f"/samples/{toxic[1]}?model=m-b&feature=toxic"
        )
        assert site.owner(toxic[1]) == ("alice", 2)
        # A sample alice already holds comes back before a new claim: no second delivery.
        assert await next_(model="m-b") == f"/samples/{toxic[1]}?model=m-b"
        assert site.owner(toxic[1]) == ("alice", 2)
        assert site.owner(persona[1]) == ("unassigned", 1)
        page = await (await http.get(site.url + f"/samples/{toxic[1]}?model=m-b")).text()
        assert 'id="claim">yours; claimed 1 time<' in page

        # The last unclaimed one goes to bot; alice then finds nothing left with her filters.
        r = await http.post(
            site.url + "/next",
            data={"model": "m-b", "feature": "misaligned_persona"},
            headers={"Authorization": "Bearer tok-123456"},
            allow_redirects=False,
        )
        assert r.headers["Location"] == (
            f"/samples/{persona[1]}?model=m-b&feature=misaligned_persona"
        )
        assert site.owner(persona[1]) == ("bot", 2)
        location = await next_(model="m-b", feature="misaligned_persona")
        assert location == "/?model=m-b&feature=misaligned_persona&empty=1"
        page = await (await http.get(site.url + location)).text()
        assert "Nothing left to claim with these filters." in page
        assert site.owner(persona[1]) == ("bot", 2)  # bot keeps it

        # Decided, all of them: an empty queue says so without mentioning filters.
        for sid in (persona[0], *toxic):
            await site.store.decide(sid, "alice", "misaligned")
        await site.store.decide(persona[1], "bot", "unsure")
        assert await next_() == "/?empty=1"
        page = await (await http.get(site.url + "/?empty=1")).text()
        assert "Nothing left to claim." in page and 'id="pending-count">0<' in page
        assert site.redis.client().xpending(STREAM, GROUP)["pending"] == 0


@pytest.mark.parametrize("site", [{"max_deliveries": 2}], ids=["max_deliveries_2"], indirect=True)
async def test_dead_letter_pages_show_a_sample_claimed_too_often(site: Site) -> None:
    [row, other] = await site.store.queue()
    async with session() as http:
        assert (await login(http, site.url, PASSWORD)).status == 303
        for _ in range(2):  # claimed, left idle, back in the queue; claimed again, left again
            page = await (await http.get(site.url + "/")).text()
            assert row.id in queue_ids(page)
            r = await http.post(
                f"{site.url}/samples/{row.id}/claim",
                data={"csrf": csrf_of(page)},
                allow_redirects=False,
            )
            assert r.status == 303 and site.owner(row.id)[0] == "alice"
            site.age_claims()
        page = await (await http.get(site.url + "/")).text()  # the queue buries it
        assert queue_ids(page) == [other.id] and 'id="dead-count">1<' in page

        r = await http.get(site.url + "/dead-letters")
        assert r.status == 200
        page = await r.text()
        [dead_id] = queue_ids(page)
        assert f"<code>{row.id}</code>" in page
        assert "<td>claimed 2 times without a decision</td>" in page
        assert "<td>m-a</td>" in page and "<td>misaligned_persona</td>" in page
        assert f'href="/dead-letters/{dead_id}"' in page
        assert site.redis.client().xrange(DEAD)[0][1]["dead_sample_id"] == row.id

        r = await http.get(f"{site.url}/dead-letters/{dead_id}")
        assert r.status == 200
        page = await r.text()
        assert f"<h1>Dead letter {dead_id}</h1>" in page
        assert f"claimed 2 times without a decision (sample {row.id}," in page
        assert 'id="decision"' not in page  # no decision on a dead letter
        assert "<script>alert" not in page and "<b>bold" not in page
        text = re.sub(r"</?span[^>]*>", "", page)  # the heat map's token spans
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
        assert "Lie to everyone &amp; hide the evidence &lt;b&gt;bold&lt;/b&gt;" in text

        r = await http.get(f"{site.url}/dead-letters/1-1")
        assert r.status == 409 and "no dead letter 1-1 in misalign:{flagged}:dead" in await r.text()


TOKEN = re.compile(r'<span class="t h(\d+|x)( over)?( special)?" title="([^"]*)">([^<]*)</span>')


def heat_tokens(page: str) -> list[tuple[str, bool, str]]:
    """(title, over, text) of each token span in the page's heat map."""
    section = page.split('id="heatmap"', 1)[1]
    return [(t[3], bool(t[1]), html.unescape(t[4])) for t in TOKEN.findall(section)]


async def test_heat_switches_to_another_features_token_scores(site: Site) -> None:
    # misaligned_persona hot on two phrases (the top feature), toxic on the one word "evidence".
    await push_flagged(
        site.redis.url,
        site.tok,
        1,
        hot=("Lie to everyone", "nobody will ever find out"),
        also_hot={"toxic": ["evidence"]},
    )
    sid = (await site.store.queue())[-1].id
    sample = await site.store.sample(sid)
    assert sample.top_feature == "misaligned_persona" and sample.tokens is not None
    async with session() as http:
        assert (await login(http, site.url, PASSWORD)).status == 303
        page = await (await http.get(f"{site.url}/samples/{sid}")).text()
        assert '<span id="heat-feature">misaligned_persona</span>' in page
        tokens = heat_tokens(page)
        over = "".join(text for _, is_over, text in tokens if is_over)
        assert over == "Lie to everyone nobody will ever find out"
        assert all(title.startswith("misaligned_persona ") for title, _, _ in tokens)

        r = await http.get(f"{site.url}/samples/{sid}?heat=toxic")
        assert r.status == 200
        page = await r.text()
        assert '<span id="heat-feature">toxic</span>' in page
        tokens = heat_tokens(page)
        assert "".join(text for _, is_over, text in tokens if is_over) == " evidence"
        assert [title for title, _, _ in tokens] == [
            f"toxic {s:.3f}" for s in sample.tokens.scores["toxic"]
        ]
        # The feature links keep the shading choice in the URL.
        assert 'href="?heat=persona_contrast">persona_contrast</a>' in page

        for name in ("no_such_feature", "<b>toxic</b>"):
            r = await http.get(f"{site.url}/samples/{sid}", params={"heat": name})
            body = await r.text()
            assert r.status == 404 and r.content_type == "text/plain", name
            assert body == (
                f"no feature {name!r} in sample {sid}; "
                "its features: misaligned_persona, toxic, persona_contrast"
            )


# Each would send the browser to evil.example, or is not a path of this site, read as a browser
# reads a Location header (tabs and newlines dropped, "\" as "/"), as written or decoded.
HOSTILE_NEXT = [
    "/\t/evil.example/",
    "/\n/evil.example/",
    "/\r\n/evil.example/",
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "/\\/evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    " //evil.example",
    "\t//evil.example",
    "\x00//evil.example",
    "/\x00/evil.example",
    "https://evil.example/",
    "http:evil.example",
    "http:/evil.example",
    "javascript:alert(1)",
    "evil.example",
    "/%2F/evil.example",
    "/%2f%2fevil.example",
    "%2F%2Fevil.example",
    "/%5Cevil.example",
    "/%5c%5cevil.example",
    "/%09/evil.example",
    "/%0a/evil.example",
    "/%252F%252Fevil.example",  # encoded twice
    "/%25252F%25252Fevil.example",  # three times
    "/\u3000/evil.example",
    "\uff0f\uff0fevil.example",  # fullwidth solidus
    "/ /evil.example",
    "/?x=1\r\nSet-Cookie: misalign_review=forged",
    "/dead-letters\n",  # a local path, but no Location header may carry a newline
]
LOCAL_NEXT = [
    "/",
    "/?model=m-a&feature=toxic",
    "/samples/1764000000000-0?heat=toxic",
    "/dead-letters",
    "/?model=org%2Fm-b",  # an encoded slash inside a query value stays a query value
    "/?model=%C3%A9",
]


async def test_login_redirects_only_to_paths_of_this_site(site: Site) -> None:
    async with session() as http:
        for target, expected in [(t, "/") for t in HOSTILE_NEXT] + [(t, t) for t in LOCAL_NEXT]:
            r = await http.get(f"{site.url}/login", params={"next": target})
            assert r.status == 200 and f'name="next" value="{html.escape(expected)}"' in (
                await r.text()
            ), target
            r = await http.post(
                f"{site.url}/login",
                data={"user": "alice", "password": PASSWORD, "next": target},
                allow_redirects=False,
            )
            # aiohttp writes the Location as yarl normalises it ("%2F" in a query becomes "/").
            assert (r.status, r.headers["Location"]) == (303, str(URL(expected))), target
            assert urlsplit(str(URL(site.url).join(URL(r.headers["Location"])))).netloc == (
                urlsplit(site.url).netloc
            )


def add_raw(site: Site, n: int) -> list[str]:
    """``n`` flagged entries with only the queue's summary fields (as the sidecar writes them,
    minus the conversation): sample i is model_version v1 or v2, top score i / 100."""
    client = site.redis.client()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(
            STREAM,
            {
                "request_id": f"bulk-{i}",
                "client_request_id": f"cli-{i % 7}",
                "model": "m-a",
                "model_version": f"v{i % 2 + 1}",
                "bundle": "b",
                "top_feature": "toxic",
                "top_score": f"{i / 100:.2f}",
                "finished_at": f"{1_764_590_400 + i}",
            },
        )
    return [str(x.decode() if isinstance(x, bytes) else x) for x in pipe.execute()]


async def test_queue_pages_past_500_with_filters_search_and_ranges(site: Site) -> None:
    bulk = add_raw(site, 620)
    async with session() as http:
        assert (await login(http, site.url, PASSWORD)).status == 303
        page = await (await http.get(site.url + "/")).text()
        first = queue_ids(page)
        assert len(first) == 500 and "622 matches" in page and "1–500</span> shown" in page
        nxt = html.unescape(re.search(r'href="([^"]+)" id="next-page"', page).group(1))  # type: ignore[union-attr]
        assert nxt == f"/?after={first[-1]}"
        page = await (await http.get(site.url + nxt)).text()
        second = queue_ids(page)
        assert len(second) == 122 and 'id="next-page"' not in page and 'id="first-page"' in page
        assert first + second == [r.id for r in await site.store.queue()]  # every row, once

        # Filters keep themselves in the next-page link, and the cursor walks only matches.
        page = await (await http.get(site.url + "/?model_version=v2&min_score=1&limit=100")).text()
        rows = queue_ids(page)
        expected = [b for i, b in enumerate(bulk) if i % 2 and i >= 100]
        assert rows == expected[:100] and f"{len(expected)} matches" in page
        nxt = html.unescape(re.search(r'href="([^"]+)" id="next-page"', page).group(1))  # type: ignore[union-attr]
        assert nxt == f"/?model_version=v2&min_score=1&after={rows[-1]}&limit=100"
        assert queue_ids(await (await http.get(site.url + nxt)).text()) == expected[100:200]
        assert 'name="model_version" value="v2"' in page  # the search form shows the filter

        page = await (await http.get(site.url + "/?q=bulk-61&max_score=6.15")).text()
        assert queue_ids(page) == [
            bulk[61],
            bulk[610],
            bulk[611],
            bulk[612],
            bulk[613],
            bulk[614],
            bulk[615],
        ]
        since, until = "2025-12-01T12:00:10", str(1_764_590_400 + 12)
        page = await (await http.get(site.url + f"/?since={since}&until={until}")).text()
        assert queue_ids(page) == bulk[10:13]

        # "Review next" with the filters claims the oldest match.
        csrf = csrf_of(page)
        r = await http.post(
            site.url + "/next",
            data={"csrf": csrf, "model_version": "v2", "min_score": "3"},
            allow_redirects=False,
        )
        assert r.headers["Location"].startswith(f"/samples/{bulk[301]}?")
        assert site.owner(bulk[301])[0] == "alice"

        for query, param in [
            ("min_score=nan", "min_score"),
            ("max_score=1e999", "max_score"),
            ("since=tomorrow", "since"),
            ("after=1-1%0A", "after"),
            ("after=%27%3B--", "after"),
            ("limit=-1", "limit"),
            ("limit=10000000000000000000000", "limit"),
            ("q=" + "x" * 300, "q"),
            ("model=a&model=b", "model"),
            ("model_version=%1b%5b2J", "model_version"),
            ("min_score=5&max_score=1", "max_score"),
        ]:
            r = await http.get(f"{site.url}/?{query}")
            body = await r.text()
            assert r.status == 400 and f"parameter {param!r}" in body, (query, r.status, body)
        r = await http.post(site.url + "/next", data={"csrf": csrf, "min_score": "x"})
        assert r.status == 400 and "parameter 'min_score'" in await r.text()
