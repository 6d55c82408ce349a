"""Review pages (the real aiohttp app on a real socket) sharing one real Redis, as replicas do."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from review.store import ReviewStore
from review.web import COOKIE, create_app
from service import redis_keys
from service.review_settings import ReviewSettings, ReviewUser

PASSWORDS = {"alice": "correct horse battery", "bob": "staple-7e1c"}
TOKEN = "tok-5f0c2a9e"


def users(tmp_path: Path, monkeypatch: Any) -> tuple[ReviewUser, ...]:
    """alice and bob log in with passwords, bot with a token."""
    for name, password in PASSWORDS.items():
        monkeypatch.setenv(f"REVIEW_{name.upper()}_PW", password)
    (tmp_path / "bot.token").write_text(TOKEN + "\n")
    return (
        ReviewUser(name="alice", password_env="REVIEW_ALICE_PW"),
        ReviewUser(name="bob", password_env="REVIEW_BOB_PW"),
        ReviewUser(name="bot", token_file=tmp_path / "bot.token"),
    )


@dataclass
class Page:
    url: str
    store: ReviewStore
    runner: web.AppRunner
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()
            await self.store.close()


class Clock:
    """The page's clock in a test: it moves only when the test moves ``now``."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def start_page(
    redis_url: str, settings: ReviewSettings, clock: Callable[[], float] = time.time
) -> Page:
    """One review page with a Redis client of its own, listening on a free loopback port."""
    store = ReviewStore.from_url(
        redis_url,
        stream=redis_keys.FLAGGED_STREAM,
        group="reviewers",
        dead_stream=redis_keys.DEAD_LETTER_STREAM,
        labels_stream=redis_keys.LABELS_STREAM,
        claim_idle_s=settings.claim_idle_s,
        max_deliveries=settings.max_deliveries,
    )
    await store.ensure_group()
    runner = web.AppRunner(create_app(store, settings, settings.credentials(), clock=clock))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Page(f"http://127.0.0.1:{runner.addresses[0][1]}", store, runner)


def client(address: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A client without a cookie jar whose connections come from ``address`` (any of 127/8)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def log_in(
    http: aiohttp.ClientSession, url: str, user: str, password: str
) -> aiohttp.ClientResponse:
    return await http.post(
        f"{url}/login",
        data={"user": user, "password": password, "next": "/"},
        allow_redirects=False,
    )


def cookie_of(r: aiohttp.ClientResponse) -> dict[str, str]:
    """The ``Cookie`` header that replays the session a login response set."""
    return {"Cookie": f"{COOKIE}={r.cookies[COOKIE].value}"}


def csrf_in(page: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m, "no CSRF token in the page"
    return m.group(1)
