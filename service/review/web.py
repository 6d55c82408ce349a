"""The review page: login, queue, sample view with a token heat map, decisions, dead letters.

Plain server-rendered HTML (Jinja2, autoescaped: conversation text is hostile input) and one small
script for the keyboard shortcuts; a Content-Security-Policy allows scripts and styles from this
origin only. Every route but ``/login``, ``/healthz`` and ``/static`` needs a login: a session
cookie (HttpOnly, SameSite=Strict, signed with a per-process key) from the login form, or
``Authorization: Bearer TOKEN`` for scripts. Form posts from a session carry a CSRF token.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web

from service.review.heatmap import heat_map
from service.review.settings import Credentials, ReviewSettings
from service.review.store import (
    DECISIONS,
    ReviewError,
    ReviewStore,
    SampleState,
    facet_counts,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "misalign_review"
PUBLIC = ("/login", "/healthz")
ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
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


@dataclass(frozen=True)
class Session:
    user: str
    sid: str


class Auth:
    """Checks passwords and tokens in constant time; issues and verifies signed session cookies."""

    def __init__(self, users: list[Credentials], ttl_s: float) -> None:
        self.users = {u.name: u for u in users}
        self.ttl_s = ttl_s
        self.key = secrets.token_bytes(32)
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

    def _sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, name: str) -> str:
        payload = f"{name}:{int(time.time() + self.ttl_s)}:{secrets.token_urlsafe(16)}"
        return f"{payload}:{self._sign(payload)}"

    def session(self, cookie: str | None) -> Session | None:
        if not cookie or cookie.count(":") != 3:
            return None
        payload, sig = cookie.rsplit(":", 1)
        if not hmac.compare_digest(_bytes(self._sign(payload)), _bytes(sig)):
            return None
        name, exp, sid = payload.split(":")
        if not exp.isdigit() or int(exp) < time.time() or name not in self.users:
            return None
        return Session(name, sid)

    def csrf(self, session: Session) -> str:
        return self._sign(f"csrf:{session.sid}")


STORE = web.AppKey("store", ReviewStore)
AUTH = web.AppKey("auth", Auth)
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


def _safe_next(target: str | None) -> str:
    # Only paths on this site: no scheme, no host, no protocol-relative "//".
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _same_origin(request: web.Request) -> bool:
    # Host only: behind a TLS-terminating proxy the scheme seen here is http.
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC or request.path.startswith("/static/"):
        return await handler(request)
    auth = request.app[AUTH]
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        user = auth.bearer(header.removeprefix("Bearer ").strip())
        if user is None:
            raise web.HTTPUnauthorized(text="invalid token")
        request[USER], request[CSRF] = user, ""
        return await handler(request)
    session = auth.session(request.cookies.get(COOKIE))
    if session is None:
        if request.method == "GET":
            raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
        raise web.HTTPUnauthorized(text="login required")
    csrf = auth.csrf(session)
    if request.method == "POST":
        form = await request.post()
        given = _bytes(str(form.get("csrf", "")))
        if not _same_origin(request) or not hmac.compare_digest(given, _bytes(csrf)):
            raise web.HTTPForbidden(text="missing or wrong CSRF token; reload the page")
    request[USER], request[CSRF] = session.user, csrf
    return await handler(request)


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
    if not ENTRY_ID.match(value):
        raise web.HTTPNotFound(text=f"not a stream entry id: {value!r}")
    return value


# --- routes -----------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _page(request, "login.html", error=None, next=_safe_next(request.query.get("next")))


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    if not _same_origin(request):
        raise web.HTTPForbidden(text="cross-origin login refused")
    form = await request.post()
    target = _safe_next(str(form.get("next", "/")))
    user = request.app[AUTH].login(str(form.get("user", "")), str(form.get("password", "")))
    if user is None:
        await asyncio.sleep(0.5)  # slows guessing
        return _page(request, "login.html", status=401, error="wrong user or password", next=target)
    resp = web.HTTPSeeOther(target)
    resp.set_cookie(
        COOKIE,
        request.app[AUTH].issue(user),
        httponly=True,
        samesite="Strict",
        secure=request.app[SETTINGS].secure_cookie,
        path="/",
        max_age=int(request.app[AUTH].ttl_s),
    )
    log.info("review login: %s", user)
    raise resp


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


def _decided(request: web.Request) -> str:
    value = request.query.get("decided", "")
    return value if ENTRY_ID.match(value) else ""


def _filters(values: Any) -> dict[str, str]:
    return {k: str(values[k]) for k in ("model", "feature") if values.get(k)}


@routes.get("/")
async def queue(request: web.Request) -> web.Response:
    store = request.app[STORE]
    rows = await store.queue()
    counts = await store.counts()
    filters = _filters(request.query)
    by_model, by_feature = facet_counts(rows)
    shown = [
        r
        for r in rows
        if r.model == filters.get("model", r.model)
        and r.top_feature == filters.get("feature", r.top_feature)
    ]
    return _page(
        request,
        "queue.html",
        rows=shown[:QUEUE_ROWS],
        matching=len(shown),
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


def _after(filters: dict[str, str], **extra: str) -> str:
    query = urlencode({**filters, **extra})
    return "/" + (f"?{query}" if query else "")


@routes.post("/next")
async def next_sample(request: web.Request) -> web.Response:
    filters = _filters(await request.post())
    sid = await request.app[STORE].claim_next(
        request[USER], filters.get("model"), filters.get("feature")
    )
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
    filters = _filters(form)
    if form.get("then") == "next":
        nxt = await store.claim_next(request[USER], filters.get("model"), filters.get("feature"))
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
    store: ReviewStore, settings: ReviewSettings, users: list[Credentials]
) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=64 * 1024)
    app[STORE] = store
    app[AUTH] = Auth(users, settings.session_ttl_s)
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
