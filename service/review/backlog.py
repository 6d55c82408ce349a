"""The sidecar's review gauges, refreshed from Redis every few seconds.

``misalign_review_backlog``: entries of the flagged stream the reviewers' group has not decided
(not yet read plus pending); ``misalign_review_dead_letter``: length of the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Gauge
from redis.exceptions import RedisError

from service.redis_conn import RedisClient
from service.review.store import review_counts

log = logging.getLogger(__name__)


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
