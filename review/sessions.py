"""Review-page sessions, held in Redis so that a restart keeps them, replicas share them and a
logout revokes them.

The cookie carries only a random session id (256 bits). Redis holds, under the SHA-256 of that
id, the session's user, its CSRF token and its expiry, with the session's lifetime as the key's
TTL too. Keying by the digest means that whoever can read Redis (the sidecar's ACL user can) sees
no cookie it could present. The expiry in the record is read against the page's own clock, so a
session ends on the page's time, not only on Redis's (and a test moves that clock instead of
waiting out a lifetime).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from detectors.errors import ReviewError
from service.redis_conn import RedisClient

PREFIX = "misalign:review:"
# What secrets.token_urlsafe(32) makes; anything else is refused before Redis is asked.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


def review_key(*parts: str) -> str:
    """A Redis key of the review page's own (the store's stream keys are named elsewhere)."""
    return PREFIX + ":".join(parts)


async def redis_call(where: str, coro: Any) -> Any:
    """Awaits a Redis command; Redis out of reach becomes the page's 503 (``ReviewError``)."""
    try:
        return await coro
    except RedisError as exc:
        raise ReviewError(f"redis at {where}: {exc}") from exc


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str


class SessionStore:
    def __init__(
        self,
        client: RedisClient,
        ttl_s: float,
        where: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.where = where
        self.clock = clock

    @staticmethod
    def key(session_id: str) -> str:
        return review_key("sess", hashlib.sha256(session_id.encode()).hexdigest())

    async def create(self, user: str) -> tuple[str, Session]:
        """A new session for ``user``: its id (for the cookie) and the session."""
        session_id = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_hex(32))
        expires_at = self.clock() + self.ttl_s
        record = json.dumps({"user": session.user, "csrf": session.csrf, "expires_at": expires_at})
        px = int(self.ttl_s * 1000)
        await redis_call(self.where, self.client.set(self.key(session_id), record, px=px))
        return session_id, session

    async def get(self, session_id: str | None) -> Session | None:
        if not session_id or not SESSION_ID.fullmatch(session_id):
            return None
        record = await redis_call(self.where, self.client.get(self.key(session_id)))
        if record is None:
            return None
        try:
            fields = json.loads(record)
            session = Session(str(fields["user"]), str(fields["csrf"]))
            # Records from before the expiry was kept in them: the key's TTL alone bounds them.
            expires_at = float(fields.get("expires_at", math.inf))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # not a record this module wrote: no session, rather than a 500
        return session if self.clock() < expires_at else None

    async def revoke(self, session_id: str | None) -> None:
        if session_id and SESSION_ID.fullmatch(session_id):
            await redis_call(self.where, self.client.delete(self.key(session_id)))
