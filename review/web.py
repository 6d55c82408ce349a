"""The review page: login, queue, sample view with a token heat map, decisions, dead letters.

Plain server-rendered HTML (Jinja2, autoescaped: conversation text is hostile input) and one small
script for the keyboard shortcuts; a Content-Security-Policy allows scripts and styles from this
origin only. Every route but ``/login``, ``/healthz``, ``/metrics`` and ``/static`` needs a
login: a session cookie (HttpOnly, SameSite=Strict; the session itself is in Redis,
``review/sessions.py``) from the login form, or ``Authorization: Bearer TOKEN`` for
scripts. Form posts from a session carry the session's CSRF token. Failed logins and tokens are
throttled per user and per client address (``review/throttle.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

import jinja2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from detectors.errors import ReviewError, SampleState
from review.heatmap import heat_map
from review.query import QueryError, QueueQuery, page
from review.sessions import Session, SessionStore
from review.store import DECISIONS, ReviewStore, facet_counts
from review.throttle import LoginThrottle, Verdict, client_address
from service.review_settings import Credentials, ReviewSettings

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "misalign_review"
PUBLIC = ("/login", "/healthz", "/metrics")
ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")  # fullmatch: "$" lets a final newline in
QUEUE_ROWS = 500
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes form posts send Origin: null
    "X-Frame-Options": "DENY",
}


def _bytes(text: str) -> bytes:
    # Headers arrive with undecodable bytes as lone surrogates, and compare_digest refuses
    # non-ASCII str: hostile input must be refused, not a 500.
    return text.encode("utf-8", "surrogatepass")


def _digest(secret: str) -> bytes:
    # Equal-length inputs for compare_digest, so not even the length of a secret leaks.
    return hashlib.sha256(_bytes(secret)).digest()


class Auth:
    """Checks passwords and tokens in constant time."""

    def __init__(self, users: list[Credentials]) -> None:
        self.users = {u.name: u for u in users}
        self._nobody = _digest(secrets.token_hex(16))

    def login(self, name: str, secret: str) -> str | None:
        user = self.users.get(name)
        given = _digest(secret)
        ok = False
        for stored in (user.password, user.token) if user else (None, None):
            match = hmac.compare_digest(_digest(stored) if stored else self._nobody, given)
            ok |= match and stored is not None
        return name if ok and user is not None else None

    def bearer(self, token: str) -> str | None:
        given = _digest(token)
        found = None
        for u in self.users.values():  # no early exit: the time does not tell who matched
            if (
                hmac.compare_digest(_digest(u.token) if u.token else self._nobody, given)
                and u.token
            ):
                found = u.name
        return found


STORE = web.AppKey("store", ReviewStore)
AUTH = web.AppKey("auth", Auth)
SESSIONS = web.AppKey("sessions", SessionStore)
THROTTLE = web.AppKey("throttle", LoginThrottle)
REGISTRY = web.AppKey("registry", CollectorRegistry)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
SETTINGS = web.AppKey("settings", ReviewSettings)
USER = web.RequestKey("user", str)
CSRF = web.RequestKey("csrf", str)


def _ts(value: float | None) -> str:
    if value is None:
        return "—"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ts=_ts, num=_num, duration=_duration)
    return env


# What a page's own links hold: printable ASCII, no space, no backslash (a browser reads "\\"
# as "/"); anything else (encoded by yarl when the login redirect was made) is refused whole.
_PLAIN_PATH = re.compile(r"/[!-\[\]-~]*")
# What a browser drops from a URL before parsing it (WHATWG URL: tabs and newlines anywhere,
# C0 controls and spaces at either end).
_DROPPED = re.compile(r"[\t\n\r]")
_EDGES = "".join(map(chr, range(0x21)))


def _safe_next(target: str | None) -> str:
    """``target`` when a browser would resolve it to a path on this site, else ``/``.

    It is checked as written and after each round of percent-decoding (a proxy or a later
    redirect may decode it once more): at every stage, read as a browser reads it, it must have
    no scheme and no host, and must not start with ``//`` (a host on another site)."""
    if not target or len(target) > 2000 or not _PLAIN_PATH.fullmatch(target):
        return "/"
    seen = target
    for _ in range(4):
        browser = _DROPPED.sub("", seen).strip(_EDGES).replace("\\", "/")
        parts = urlsplit(browser)
        if parts.scheme or parts.netloc or not browser.startswith("/") or browser.startswith("//"):
            return "/"
        decoded = unquote(seen)
        if decoded == seen:
            return target
        seen = decoded
    return "/"  # still decoding after four rounds: nothing a page of ours links to


def _same_origin(request: web.Request) -> bool:
    # Host only: behind a TLS-terminating proxy the scheme seen here is http.
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC or request.path.startswith("/static/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        user = request.app[AUTH].bearer(header.removeprefix("Bearer ").strip())
        verdict = await request.app[THROTTLE].bearer(_address(request), ok=user is not None)
        if verdict.retry_after_s:
            raise _too_many(verdict)
        if user is None:
            raise web.HTTPUnauthorized(text="invalid token")
        request[USER], request[CSRF] = user, ""
        return await handler(request)
    session = await _session(request)
    if session is None:
        if request.method == "GET":
            raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
        raise web.HTTPUnauthorized(text="login required")
    if request.method == "POST":
        form = await request.post()
        given = _bytes(str(form.get("csrf", "")))
        if not _same_origin(request) or not hmac.compare_digest(given, _bytes(session.csrf)):
            raise web.HTTPForbidden(text="missing or wrong CSRF token; reload the page")
    request[USER], request[CSRF] = session.user, session.csrf
    return await handler(request)


async def _session(request: web.Request) -> Session | None:
    session = await request.app[SESSIONS].get(request.cookies.get(COOKIE))
    # A user removed from the settings is logged out at the next restart of the page.
    return session if session is not None and session.user in request.app[AUTH].users else None


def _address(request: web.Request) -> str:
    return client_address(
        request.remote,
        request.headers.get("X-Forwarded-For"),
        request.app[SETTINGS].trusted_proxies,
    )


def _too_many(verdict: Verdict) -> web.HTTPTooManyRequests:
    return web.HTTPTooManyRequests(
        text=f"too many failed logins; try again in {verdict.retry_after_s} s",
        headers={"Retry-After": str(verdict.retry_after_s)},
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SampleState as exc:
        return _page(request, "message.html", status=409, title="Not available", message=str(exc))
    except ReviewError as exc:
        log.warning("review page: %s", exc)
        return _page(
            request, "message.html", status=503, title="Redis unavailable", message=str(exc)
        )


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"


def _page(request: web.Request, name: str, status: int = 200, **ctx: Any) -> web.Response:
    html = (
        request.app[TEMPLATES]
        .get_template(name)
        .render(user=request.get(USER), csrf=request.get(CSRF, ""), **ctx)
    )
    return web.Response(text=html, status=status, content_type="text/html")


def _entry_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if not ENTRY_ID.fullmatch(value):
        raise web.HTTPNotFound(text=f"not a stream entry id: {value!r}")
    return value


# --- routes -----------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _page(request, "login.html", error=None, next=_safe_next(request.query.get("next")))


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    if not _same_origin(request):
        raise web.HTTPForbidden(text="cross-origin login refused")
    form = await request.post()
    target = _safe_next(str(form.get("next", "/")))
    name = str(form.get("user", ""))
    user = request.app[AUTH].login(name, str(form.get("password", "")))
    # Asked whatever the result: after too many failures even the right password is refused.
    verdict = await request.app[THROTTLE].login(name, _address(request), ok=user is not None)
    if verdict.retry_after_s:
        page = _page(
            request,
            "login.html",
            status=429,
            error=f"too many failed logins; try again in {verdict.retry_after_s} s",
            next=target,
        )
        page.headers["Retry-After"] = str(verdict.retry_after_s)
        return page
    if user is None:
        return _page(request, "login.html", status=401, error="wrong user or password", next=target)
    session_id, _ = await request.app[SESSIONS].create(user)
    resp = web.HTTPSeeOther(target)
    resp.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="Strict",
        secure=request.app[SETTINGS].secure_cookie,
        path="/",
        max_age=int(request.app[SETTINGS].session_ttl_s),
    )
    log.info("review login: %s", user)
    raise resp


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    await request.app[SESSIONS].revoke(request.cookies.get(COOKIE))
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


def _decided(request: web.Request) -> str:
    value = request.query.get("decided", "")
    return value if ENTRY_ID.fullmatch(value) else ""


def _query(values: Any) -> QueueQuery:
    """The queue's filters (and cursor) from a query string or a form; 400 naming the parameter
    that does not fit."""
    try:
        return QueueQuery.parse(values)
    except QueryError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None


def _filters(values: Any) -> dict[str, str]:
    return _query(values).filters()


@routes.get("/")
async def queue(request: web.Request) -> web.Response:
    store = request.app[STORE]
    query = _query(request.query)
    rows = await store.queue()
    counts = await store.counts()
    filters = query.filters()
    by_model, by_feature = facet_counts(rows)
    shown = page(rows, query, QUEUE_ROWS)
    return _page(
        request,
        "queue.html",
        rows=shown.rows,
        matching=shown.matching,
        before=shown.before,
        next_page=_after(filters, after=shown.next_after or "", **_limit(query))
        if shown.next_after
        else None,
        first_page=_after(filters, **_limit(query)) if query.after else None,
        total=len(rows),
        unclaimed=sum(1 for r in rows if r.claim and r.claim.unclaimed),
        dead_letters=counts.dead_letters,
        by_model=sorted(by_model.items()),
        by_feature=sorted(by_feature.items()),
        filters=filters,
        decided=_decided(request),
        empty=request.query.get("empty") == "1",
        claim_idle_s=store.claim_idle_ms / 1000,
    )


def _limit(query: QueueQuery) -> dict[str, str]:
    return {"limit": str(query.limit)} if query.limit else {}


def _after(filters: dict[str, str], **extra: str) -> str:
    query = urlencode({**filters, **extra})
    return "/" + (f"?{query}" if query else "")


@routes.post("/next")
async def next_sample(request: web.Request) -> web.Response:
    query = _query(await request.post())
    filters = query.filters()
    sid = await request.app[STORE].claim_next(request[USER], match=query.matches)
    raise web.HTTPSeeOther(
        f"/samples/{sid}?{urlencode(filters)}" if sid else _after(filters, empty="1")
    )


@routes.get("/samples/{id}")
async def sample_view(request: web.Request) -> web.Response:
    sample = await request.app[STORE].sample(_entry_id(request))
    names = [f.name for f in sample.features]
    feature = request.query.get("heat", "")
    if feature and feature not in names:
        # Not a quiet fallback: the reviewer asked for one feature's shading.
        raise web.HTTPNotFound(
            text=f"no feature {feature!r} in sample {sample.id}; "
            f"its features: {', '.join(names) or 'none'}"
        )
    if not feature:
        feature = sample.top_feature if sample.top_feature in names else (names or [""])[0]
    mine = sample.claim is not None and sample.claim.owner == request[USER]
    return _page(
        request,
        "sample.html",
        sample=sample,
        heat=heat_map(sample, feature),
        heat_feature=feature,
        mine=mine,
        decisions=DECISIONS,
        filters=_filters(request.query),
        dead=None,
        decided=_decided(request),
    )


@routes.post("/samples/{id}/claim")
async def claim(request: web.Request) -> web.Response:
    sid = _entry_id(request)
    await request.app[STORE].claim(sid, request[USER])
    raise web.HTTPSeeOther(f"/samples/{quote(sid)}")


@routes.post("/samples/{id}/decision")
async def decide(request: web.Request) -> web.Response:
    sid = _entry_id(request)
    form = await request.post()
    store = request.app[STORE]
    decision = str(form.get("decision", ""))
    if decision not in DECISIONS:
        raise web.HTTPBadRequest(text=f"decision {decision!r}: expected one of {DECISIONS}")
    await store.decide(sid, request[USER], decision, str(form.get("note", ""))[:2000])
    query = _query(form)
    filters = query.filters()
    if form.get("then") == "next":
        nxt = await store.claim_next(request[USER], match=query.matches)
        if nxt:
            raise web.HTTPSeeOther(f"/samples/{nxt}?{urlencode({**filters, 'decided': sid})}")
    raise web.HTTPSeeOther(_after(filters, decided=sid))


@routes.get("/dead-letters")
async def dead_letters(request: web.Request) -> web.Response:
    return _page(request, "dead.html", rows=await request.app[STORE].dead_letters())


@routes.get("/dead-letters/{id}")
async def dead_letter(request: web.Request) -> web.Response:
    dead = await request.app[STORE].dead_letter(_entry_id(request))
    sample = dead.sample
    names = [f.name for f in sample.features]
    feature = sample.top_feature if sample.top_feature in names else (names or [""])[0]
    return _page(
        request,
        "sample.html",
        sample=sample,
        heat=heat_map(sample, feature),
        heat_feature=feature,
        mine=False,
        decisions=DECISIONS,
        filters={},
        dead=dead,
        decided="",
    )


def create_app(
    store: ReviewStore,
    settings: ReviewSettings,
    users: list[Credentials],
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """``clock``: the page's time, for the login throttle's window and the sessions' expiry
    (tests move it forward instead of waiting)."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=64 * 1024)
    app[STORE] = store
    app[AUTH] = Auth(users)
    app[SESSIONS] = SessionStore(store.client, settings.session_ttl_s, store.where, clock)
    app[REGISTRY] = CollectorRegistry()
    app[THROTTLE] = LoginThrottle(
        store.client,
        store.where,
        per_user=settings.login_failures_per_user,
        per_address=settings.login_failures_per_address,
        window_s=settings.login_window_s,
        registry=app[REGISTRY],
        clock=clock,
    )
    app[TEMPLATES] = templates()
    app[SETTINGS] = settings
    app.add_routes(routes)
    app.router.add_static("/static", HERE / "static")
    app.on_response_prepare.append(_headers)
    return app


async def serve(store: ReviewStore, settings: ReviewSettings, ready_file: str | None) -> None:
    """Serve until SIGTERM or SIGINT; ``ready_file`` gets the port once listening."""
    users = settings.credentials()
    await store.ensure_group()
    runner = web.AppRunner(create_app(store, settings, users), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    log.info(
        "review page on http://%s:%d/ for %s; samples from %s",
        settings.host,
        port,
        ", ".join(u.name for u in users),
        store.where,
    )
    if ready_file:
        Path(ready_file).write_text(f"{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await store.close()
