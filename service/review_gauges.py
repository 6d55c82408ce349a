"""The sidecar's review gauges, refreshed from Redis every few seconds; the review app reads the
same counts (``review_counts``).

``misalign_review_backlog``: entries of the flagged stream the reviewers' group has not decided
(not yet read plus pending); ``misalign_review_dead_letter``: length of the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from service.redis_conn import RedisClient

log = logging.getLogger(__name__)


class Counts(BaseModel):
    model_config = ConfigDict(frozen=True)

    backlog: int  # undecided entries: not yet read into the group + pending
    dead_letters: int


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def review_counts(client: RedisClient, stream: str, group: str, dead_stream: str) -> Counts:
    """Backlog (entries the group has not decided: lag + pending) and dead letters.

    Works on a client with or without ``decode_responses`` (the sidecar's has none)."""
    groups = await client.xinfo_groups(stream) if await client.exists(stream) else []
    backlog = 0
    for g in groups:
        info = {_s(k): v for k, v in g.items()}
        if _s(info["name"]) != group:
            continue
        lag = info.get("lag")
        if lag is None:
            # Redis cannot tell the lag when entries after the group's position were deleted;
            # count what is left there instead.
            lag, cursor = 0, "(" + _s(info["last-delivered-id"])
            while page := await client.xrange(stream, cursor, "+", count=1000):
                lag += len(page)
                cursor = "(" + _s(page[-1][0])
        backlog = int(lag) + int(info["pending"])
    return Counts(backlog=backlog, dead_letters=int(await client.xlen(dead_stream)))


class ReviewGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "misalign_review_backlog",
            "Flagged samples the reviewers have not decided yet (not read + pending)",
            registry=registry,
        )
        self.dead_letter = Gauge(
            "misalign_review_dead_letter",
            "Flagged samples in the dead-letter stream",
            registry=registry,
        )


async def refresh_review_gauges(
    client: RedisClient,
    gauges: ReviewGauges,
    *,
    stream: str,
    group: str,
    dead_stream: str,
    period_s: float,
) -> None:
    """Runs until cancelled; while Redis is away the gauges keep their last values."""
    failing = False
    while True:
        try:
            counts = await review_counts(client, stream, group, dead_stream)
            gauges.backlog.set(counts.backlog)
            gauges.dead_letter.set(counts.dead_letters)
            failing = False
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("review gauges: redis unreachable (%s); keeping the last values", exc)
            failing = True
        except Exception:
            # A bug here must not stop the refreshes for the life of the sidecar.
            if not failing:
                log.exception("review gauges: refresh failed; keeping the last values")
            failing = True
        await asyncio.sleep(period_s)
