"""The login throttle against real review pages on one real Redis: failures per user name and
per client address (connections from 127.0.0.1 and 127.0.0.2), shared by replicas, logged and
counted; an injected clock ages the window."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from review.throttle import LoginThrottle, client_address
from review.web import COOKIE
from service.review_settings import ReviewSettings
from tests.support.metrics import sample
from tests.support.redis_proc import RedisProc
from tests.support.review_pages import (
    PASSWORDS,
    TOKEN,
    Clock,
    Page,
    client,
    log_in,
    start_page,
    users,
)

PER_USER, PER_ADDRESS, WINDOW_S = 3, 5, 60.0
WRONG = "Tr0ub4dor&3"  # the wrong password every failure sends; it must appear in no log line
FAIL, THROT = "misalign_review_login_failures_total", "misalign_review_login_throttled_total"


@dataclass
class Throttled:
    redis: RedisProc
    clock: Clock
    start: Callable[[], Awaitable[Page]]


@pytest.fixture
async def throttled(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Throttled]:
    """Pages with the small limits above; ``request.param`` may set ``trusted_proxies``."""
    redis = RedisProc(tmp_path / "r", persist=False).start()
    clock = Clock()
    settings = ReviewSettings(
        port=0,
        users=users(tmp_path, monkeypatch),
        login_failures_per_user=PER_USER,
        login_failures_per_address=PER_ADDRESS,
        login_window_s=WINDOW_S,
        **getattr(request, "param", {}),
    )
    pages: list[Page] = []

    async def start() -> Page:
        pages.append(await start_page(redis.url, settings, clock))
        return pages[-1]

    try:
        yield Throttled(redis, clock, start)
    finally:
        for page in pages:
            await page.stop()
        redis.stop()


async def metrics(http: aiohttp.ClientSession, page: Page) -> str:
    r = await http.get(page.url + "/metrics")
    assert r.status == 200
    return await r.text()


async def test_the_guess_after_the_limit_is_refused_even_with_the_right_password(
    throttled: Throttled, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="review")
    a, b = await throttled.start(), await throttled.start()
    clock = throttled.clock
    async with client() as http, client("127.0.0.2") as far:
        # Three wrong guesses for alice, on either replica: one count in Redis.
        for page in (a, b, a):
            r = await log_in(http, page.url, "alice", WRONG)
            assert r.status == 401 and "wrong user or password" in await r.text()
            clock.now += 1
        # The fourth, right, from another address too: refused until the first failure is 60 s old.
        for conn, page in ((http, b), (far, a)):
            r = await log_in(conn, page.url, "alice", PASSWORDS["alice"])
            assert r.status == 429 and r.headers["Retry-After"] == "57"
            assert COOKIE not in r.cookies
            assert "too many failed logins; try again in 57 s" in await r.text()
        # Another user from the same address is not held back (3 failures < 5 per address).
        assert (await log_in(http, a.url, "bob", PASSWORDS["bob"])).status == 303
        # Refused attempts are not recorded: the window still ends 60 s after the first failure.
        key = LoginThrottle.user_key("alice")
        assert throttled.redis.client().zcard(key) == PER_USER
        clock.now += 56.5
        r = await log_in(http, a.url, "alice", PASSWORDS["alice"])
        assert r.status == 429 and r.headers["Retry-After"] == "1"
        clock.now += 0.5
        r = await log_in(http, b.url, "alice", PASSWORDS["alice"])
        assert r.status == 303 and COOKIE in r.cookies
        # Counted on the replica that saw them (Prometheus sums the replicas).
        counts = {
            (name, method, p.url): sample(await metrics(http, p), name, method=method)
            for name in (FAIL, THROT)
            for method in ("form", "bearer")
            for p in (a, b)
        }
    fail, throt = FAIL, THROT
    assert counts == {
        (fail, "form", a.url): 2.0,
        (fail, "form", b.url): 1.0,
        (fail, "bearer", a.url): 0.0,
        (fail, "bearer", b.url): 0.0,
        (throt, "form", a.url): 2.0,
        (throt, "form", b.url): 1.0,
        (throt, "bearer", a.url): 0.0,
        (throt, "bearer", b.url): 0.0,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "review.throttle"]
    assert lines == [
        *["review login failed: user 'alice' from 127.0.0.1, wrong credentials"] * 3,
        "review login throttled: user 'alice' from 127.0.0.1, too many failures; retry in 57 s",
        "review login throttled: user 'alice' from 127.0.0.2, too many failures; retry in 57 s",
        "review login throttled: user 'alice' from 127.0.0.1, too many failures; retry in 1 s",
    ]
    assert WRONG not in caplog.text and PASSWORDS["alice"] not in caplog.text


async def test_concurrent_guesses_cannot_pass_the_limit(throttled: Throttled) -> None:
    page = await throttled.start()
    async with client() as http:
        responses = await asyncio.gather(
            *(log_in(http, page.url, "alice", WRONG) for _ in range(40))
        )
        statuses = sorted(r.status for r in responses)
        assert statuses == [401] * PER_USER + [429] * (40 - PER_USER)
        assert (await log_in(http, page.url, "alice", PASSWORDS["alice"])).status == 429


async def test_failures_from_one_address_are_throttled_whatever_the_user_name(
    throttled: Throttled,
) -> None:
    page = await throttled.start()
    async with client("127.0.0.2") as far, client() as near:
        for i in range(PER_ADDRESS):  # user names that do not exist count the same
            assert (await log_in(far, page.url, f"mallory{i}", WRONG)).status == 401
        r = await log_in(far, page.url, "alice", PASSWORDS["alice"])
        assert r.status == 429 and r.headers["Retry-After"] == "60"
        # The bearer token of a real user, from that address: the same count.
        r = await far.get(page.url + "/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 429 and r.headers["Retry-After"] == "60"
        # From another address alice logs in.
        assert (await log_in(near, page.url, "alice", PASSWORDS["alice"])).status == 303
        # An unknown user name is held back like a known one: a 429 tells no one who exists.
        for _ in range(PER_USER):
            assert (await log_in(near, page.url, "nobody", WRONG)).status == 401
        assert (await log_in(near, page.url, "nobody", WRONG)).status == 429
        throttled.clock.now += WINDOW_S
        assert (await log_in(far, page.url, "alice", PASSWORDS["alice"])).status == 303


async def test_bearer_token_failures_are_throttled_per_address(throttled: Throttled) -> None:
    page = await throttled.start()
    async with client("127.0.0.2") as far, client() as near:
        for i in range(PER_ADDRESS):
            r = await far.get(
                page.url + "/",
                headers={"Authorization": f"Bearer {TOKEN}{i}"},
                allow_redirects=False,
            )
            assert (r.status, await r.text()) == (401, "invalid token")
            throttled.clock.now += 2
        right = {"Authorization": f"Bearer {TOKEN}"}
        r = await far.post(page.url + "/next", headers=right, allow_redirects=False)
        assert r.status == 429 and r.headers["Retry-After"] == str(int(WINDOW_S) - 2 * PER_ADDRESS)
        assert (await near.get(page.url + "/", headers=right)).status == 200
        # Many successes in a row never throttle a script holding a valid token.
        for _ in range(3 * PER_ADDRESS):
            assert (await near.get(page.url + "/", headers=right)).status == 200
        throttled.clock.now += WINDOW_S
        assert (await far.get(page.url + "/", headers=right)).status == 200
        text = await metrics(near, page)
    assert sample(text, FAIL, method="bearer") == PER_ADDRESS
    assert sample(text, THROT, method="bearer") == 1
    assert TOKEN not in text


NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "counted"),
    [
        ("203.0.113.7", None, "203.0.113.7"),
        ("203.0.113.7", "198.51.100.1", "203.0.113.7"),  # not our proxy: its header is ignored
        ("10.1.2.3", "198.51.100.1", "198.51.100.1"),
        ("10.1.2.3", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client wrote 6.6.6.6 itself
        ("10.1.2.3", "198.51.100.1, 10.9.9.9", "198.51.100.1"),  # two proxies of ours
        ("10.1.2.3", "garbage, 10.9.9.9", "10.9.9.9"),
        ("10.1.2.3", None, "10.1.2.3"),
        ("::ffff:203.0.113.7", None, "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", None, "2001:db8:1:2::/64"),
        ("fd00::1", "2001:db8:1:2::9", "2001:db8:1:2::/64"),
        (None, "198.51.100.1", "local"),  # a Unix socket
    ],
)
def test_the_address_counted(peer: str | None, forwarded_for: str | None, counted: str) -> None:
    assert client_address(peer, forwarded_for, NETS) == counted


@pytest.mark.parametrize(
    "throttled", [{"trusted_proxies": ["127.0.0.0/8"]}], ids=["behind_a_proxy"], indirect=True
)
async def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(
    throttled: Throttled, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="review")
    page = await throttled.start()
    async with client() as proxy:
        mallory = {"X-Forwarded-For": "198.51.100.1"}
        for i in range(PER_ADDRESS):
            r = await proxy.post(
                page.url + "/login",
                data={"user": f"u{i}", "password": WRONG},
                headers=mallory,
                allow_redirects=False,
            )
            assert r.status == 401
        r = await proxy.get(page.url + "/", headers={**mallory, "Authorization": f"Bearer {TOKEN}"})
        assert r.status == 429
        # Another client behind the same proxy is not held back.
        r = await proxy.get(
            page.url + "/",
            headers={"X-Forwarded-For": "198.51.100.2", "Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status == 200
    assert "review login failed: user 'u0' from 198.51.100.1, wrong credentials" in caplog.text
