"""The login throttle: failed logins per user name and per client address, kept in Redis so that
every replica of the review page counts the same failures.

Each scope (one user name, one address) is a sorted set of its failures' times in the window.
One script prunes what the window has passed, refuses the attempt when a scope already holds its
limit, and otherwise records the attempt if it failed. The credentials are checked before the
script runs and the result goes in with it, so that a success costs no slot (scripts holding a
valid token never throttle themselves) while a right guess after the limit is still refused:
Redis runs the scripts one after another, so concurrent guesses cannot slip past the count.
Attempts refused by the throttle are not recorded, so a set never holds more than its limit.

All throttle keys share the hash tag ``{login}``: one script touches a user's and an address's
set together, which Redis Cluster allows only within one slot.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from review.sessions import redis_call, review_key
from service.redis_conn import RedisClient

log = logging.getLogger(__name__)

Method = Literal["form", "bearer"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# KEYS: the scopes' sorted sets. ARGV: now, window (s), failed (0/1), a unique member, then one
# limit per key. Returns the seconds until the attempt would be allowed ("0": allowed).
_ATTEMPT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= tonumber(ARGV[4 + i]) then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
end
if wait > 0 then
  return tostring(wait)
end
if ARGV[3] == '1' then
  for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, now, ARGV[4])
    redis.call('PEXPIRE', key, math.ceil(window * 1000))
  end
end
return '0'
"""


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The address a throttle counts: the peer, or, when the peer is a trusted proxy, the
    nearest address in ``X-Forwarded-For`` that is not one (the farther ones the client wrote
    itself). An IPv6 client counts as its /64, which one host commonly holds whole."""
    hops = [peer or ""]
    if forwarded_for:
        hops[:0] = [h.strip() for h in forwarded_for.split(",")]
    address = None
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            break  # unreadable: the last good hop is as near to the client as can be told
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not any(address in net for net in trusted):
            break
    if address is None:
        return "local"  # a Unix socket, or no readable peer
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class Verdict:
    retry_after_s: int  # 0: the attempt stands as checked; else refused for this long


class LoginThrottle:
    def __init__(
        self,
        client: RedisClient,
        where: str,
        *,
        per_user: int,
        per_address: int,
        window_s: float,
        registry: CollectorRegistry,
        clock: Callable[[], float],
    ) -> None:
        self.where = where
        self.per_user = per_user
        self.per_address = per_address
        self.window_s = window_s
        self.clock = clock
        self._attempt = client.register_script(_ATTEMPT)
        self.failures = Counter(
            "misalign_review_login_failures_total",
            "Review logins (form) and bearer tokens refused as wrong",
            ["method"],
            registry=registry,
        )
        self.throttled = Counter(
            "misalign_review_login_throttled_total",
            "Review login attempts refused with 429 because their user or address failed too often",
            ["method"],
            registry=registry,
        )
        for method in ("form", "bearer"):  # present at zero before the first failure
            self.failures.labels(method)
            self.throttled.labels(method)

    @staticmethod
    def user_key(name: str) -> str:
        # Any name is counted, known or not, so that a 429 does not tell which users exist; the
        # digest bounds the key's length whatever was typed.
        return review_key("{login}", "user", hashlib.sha256(name.encode()).hexdigest()[:32])

    @staticmethod
    def address_key(address: str) -> str:
        return review_key("{login}", "addr", address)

    async def login(self, name: str, address: str, ok: bool) -> Verdict:
        verdict = await self._run(
            [self.user_key(name), self.address_key(address)],
            [self.per_user, self.per_address],
            ok,
        )
        self._record("form", verdict, ok, f"user {name[:64]!r} from {address}")
        return verdict

    async def bearer(self, address: str, ok: bool) -> Verdict:
        verdict = await self._run([self.address_key(address)], [self.per_address], ok)
        self._record("bearer", verdict, ok, f"bearer token from {address}")
        return verdict

    async def _run(self, keys: list[str], limits: list[int], ok: bool) -> Verdict:
        args = [self.clock(), self.window_s, 0 if ok else 1, secrets.token_hex(8), *limits]
        wait = float(await redis_call(self.where, self._attempt(keys=keys, args=args)))
        return Verdict(math.ceil(wait))

    def _record(self, method: Method, verdict: Verdict, ok: bool, who: str) -> None:
        if verdict.retry_after_s:
            self.throttled.labels(method).inc()
            log.warning(
                "review login throttled: %s, too many failures; retry in %d s",
                who,
                verdict.retry_after_s,
            )
        elif not ok:
            self.failures.labels(method).inc()
            log.warning("review login failed: %s, wrong credentials", who)
