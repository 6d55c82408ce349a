"""The Redis side of review: the reviewers' consumer group on the flagged stream.

Every undecided sample sits in the group's pending list (PEL). New entries are read into it by
the consumer ``unassigned`` (the queue); a reviewer claims one with ``XCLAIM`` (each claim counts
as a delivery); a claim left idle past ``claim_idle_s`` goes back to ``unassigned`` with
``XAUTOCLAIM … JUSTID`` (which leaves the delivery count alone), unless the sample has been
claimed ``max_deliveries`` times, when it goes to the dead-letter stream instead. A decision
acknowledges the entry and appends a label to the labels stream. Each of these moves is one Lua
script, so no sample leaves the pending list without a label or a dead-letter entry.

The group's delivery count is one more than the reviewers' claims: the read into ``unassigned``
is the first delivery.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from detectors.errors import ReviewError, SampleState
from service import redis_conn
from service.flagged_sample import (
    HEADER_FIELDS,
    FeatureResult,
    FlaggedSample,
    SampleHeader,
    header_fields,
    read_features,
    sample_fields,
)
from service.redis_conn import RedisClient
from service.review_gauges import Counts, review_counts
from service.review_settings import HOLDER

Decision = Literal["misaligned", "false_positive", "unsure"]
DECISIONS: tuple[Decision, ...] = ("misaligned", "false_positive", "unsure")

# What a label reads of a sample: its header (what a queue row reads too) and its features.
LABEL_FIELDS = (*HEADER_FIELDS, "features")


class Claim(BaseModel):
    model_config = ConfigDict(frozen=True)

    owner: str  # HOLDER while no reviewer has it
    idle_s: float
    claims: int  # reviewers' claims so far

    @property
    def unclaimed(self) -> bool:
        return self.owner == HOLDER


class Summary(SampleHeader):
    """A queue row: what a reviewer sees before opening the sample."""

    id: str
    claim: Claim | None = None


class Sample(Summary, FlaggedSample):
    """A sample as the review page shows it: what the sidecar wrote, where it could be read."""

    # Set when the entry could not be read as a sample; it can still be decided or dead-lettered.
    problem: str | None = None


def parse_summary(entry_id: str, fields: dict[str, str], claim: Claim | None = None) -> Summary:
    return Summary(**header_fields(fields), id=entry_id, claim=claim)


def parse_sample(entry_id: str, fields: dict[str, str], claim: Claim | None = None) -> Sample:
    """A flagged-stream entry as a ``Sample``; a malformed one keeps what is readable and says
    what is wrong in ``problem`` (hostile or broken input must not break the page)."""
    data, problems = sample_fields(fields)
    return Sample(**data, id=entry_id, claim=claim, problem="; ".join(problems) or None)


class Label(SampleHeader):
    """One decision, as written to the labels stream and exported as JSONL: the sample's header
    and features beside the decision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    sample_id: str
    decision: Decision
    note: str = ""
    reviewer: str
    decided_at: float
    claims: int
    features: list[FeatureResult] = Field(default_factory=list)

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Label:
        data: dict[str, Any] = {k: v for k, v in fields.items() if k in cls.model_fields}
        data.update(header_fields(fields), id=entry_id)
        try:
            data["features"] = read_features(fields.get("features"))
        except (ValueError, TypeError, ValidationError):
            data["features"] = []  # the sample was unreadable; its decision still counts
        return cls.model_validate(data)


class DeadLetter(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    sample_id: str
    reason: str
    claims: int
    dead_at: float
    sample: Sample


# --- Lua: each move of a sample is one atomic step -------------------------------------------

# KEYS[1] stream, KEYS[2] dead stream; ARGV group, holder, min_idle_ms, max_claims, now, cursor,
# count. Idle reviewer claims go back to the holder; a sample claimed max_claims times, or trimmed
# from the stream while pending, goes to the dead letters instead. Returns {cursor, dead}.
_RECLAIM = """
local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[6],
                       'COUNT', ARGV[7], 'JUSTID')
local dead = 0
local function bury(id, reason, claims, fields)
  local args = {'dead_sample_id', id, 'dead_reason', reason, 'dead_claims', claims,
                'dead_at', ARGV[5]}
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call('XADD', KEYS[2], '*', unpack(args))
  redis.call('XACK', KEYS[1], ARGV[1], id)
  dead = dead + 1
end
for _, id in ipairs(res[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  local claims = tonumber(p[4]) - 1
  if claims >= tonumber(ARGV[4]) then
    local e = redis.call('XRANGE', KEYS[1], id, id)[1]
    bury(id, 'claimed ' .. claims .. ' times without a decision', claims, e and e[2] or {})
  end
end
-- XAUTOCLAIM drops pending ids whose entries were trimmed away; keep a record of each.
for _, id in ipairs(res[3] or {}) do
  bury(id, 'trimmed from the stream before a decision', -1, {})
end
return {res[1], dead}
"""

# KEYS[1] stream; ARGV group, holder, consumer, id. Only an unclaimed sample (or one's own) is
# claimed: a reviewer never takes a sample from another who is still on it.
_CLAIM = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1)[1]
if not p then return {'gone'} end
if p[2] == ARGV[3] then return {'mine', tonumber(p[4]) - 1} end
if p[2] ~= ARGV[2] then return {'held', p[2], tonumber(p[3])} end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[4])
return {'claimed', tonumber(p[4])}
"""

# KEYS[1] stream, KEYS[2] labels; ARGV group, holder, consumer, id, decision, note, now,
# then the names of the fields to copy into the label. The consumer decides a sample it holds or
# an unclaimed one; the label and the acknowledgement happen together or not at all.
_DECIDE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1)[1]
if not p then return {'gone'} end
if p[2] ~= ARGV[3] and p[2] ~= ARGV[2] then return {'held', p[2], tonumber(p[3])} end
local args = {'sample_id', ARGV[4], 'decision', ARGV[5], 'note', ARGV[6], 'reviewer', ARGV[3],
              'decided_at', ARGV[7], 'claims', tonumber(p[4]) - 1}
local keep = {}
for i = 8, #ARGV do keep[ARGV[i]] = true end
local e = redis.call('XRANGE', KEYS[1], ARGV[4], ARGV[4])[1]
if e then
  local f = e[2]
  for i = 1, #f, 2 do
    if keep[f[i]] then args[#args + 1] = f[i]; args[#args + 1] = f[i + 1] end
  end
end
local label = redis.call('XADD', KEYS[2], '*', unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[4])
return {'ok', label}
"""

# KEYS[1] stream; ARGV group, start (exclusive), count, then summary field names. Pending ids
# with their claim and only the summary fields: the queue without the conversations' bulk.
_SUMMARIES = """
local out = {}
local start = ARGV[2] == '-' and '-' or ('(' .. ARGV[2])
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], start, '+', tonumber(ARGV[3]))
for _, p in ipairs(pend) do
  local row = {p[1], p[2], tostring(p[3]), tostring(p[4])}
  local e = redis.call('XRANGE', KEYS[1], p[1], p[1])[1]
  if e then
    local f = e[2]
    for i = 4, #ARGV do
      local v = ''
      for j = 1, #f, 2 do if f[j] == ARGV[i] then v = f[j + 1]; break end end
      row[#row + 1] = v
    end
  end
  out[#out + 1] = row
end
return out
"""


class ReviewStore:
    """Review actions over one Redis client (``decode_responses=True``)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        stream: str,
        group: str,
        dead_stream: str,
        labels_stream: str,
        claim_idle_s: float,
        max_deliveries: int,
        where: str = "redis",
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.dead_stream = dead_stream
        self.labels_stream = labels_stream
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self.where = where
        self._reclaim = client.register_script(_RECLAIM)
        self._claim = client.register_script(_CLAIM)
        self._decide = client.register_script(_DECIDE)
        self._summaries = client.register_script(_SUMMARIES)

    @classmethod
    def from_url(
        cls, url: str, client_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> ReviewStore:
        """``client_options``: credentials and TLS (``redis_conn.client_options``); the URL may
        name a single Redis, a cluster or a sentinel (``redis_conn.connect``)."""
        client = redis_conn.connect(url, client_options, timeout_s=5, decode_responses=True)
        return cls(client, where=redis_conn.redact_url(url), **kwargs)

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except RedisError as exc:
            raise ReviewError(f"redis at {self.where}: {exc}") from exc

    # -- keeping the group's pending list the queue ----------------------------------------

    async def ensure_group(self) -> None:
        await self._call(redis_conn.ensure_group(self.client, self.stream, self.group))

    async def refresh(self) -> int:
        """Read new entries into the queue, return idle claims to it and bury the poison;
        returns how many samples went to the dead letters."""
        await self.ensure_group()
        while await self._call(
            self.client.xreadgroup(self.group, HOLDER, {self.stream: ">"}, count=500)
        ):
            pass
        dead = 0
        cursor = "0-0"
        while True:
            cursor, d = await self._call(
                self._reclaim(
                    keys=[self.stream, self.dead_stream],
                    args=[
                        self.group,
                        HOLDER,
                        self.claim_idle_ms,
                        self.max_deliveries,
                        f"{time.time():.3f}",
                        cursor,
                        100,
                    ],
                )
            )
            dead += int(d)
            if cursor == "0-0":
                return dead

    # -- reading ---------------------------------------------------------------------------

    async def queue(self) -> list[Summary]:
        """Every undecided sample, oldest first, without its text."""
        await self.refresh()
        out: list[Summary] = []
        start = "-"
        while True:
            rows = await self._call(
                self._summaries(keys=[self.stream], args=[self.group, start, 200, *HEADER_FIELDS])
            )
            for row in rows:
                claim = Claim(
                    owner=row[1], idle_s=int(row[2]) / 1000, claims=max(int(row[3]) - 1, 0)
                )
                values = dict(zip(HEADER_FIELDS, row[4:], strict=False))
                out.append(parse_summary(row[0], values, claim))
            if len(rows) < 200:
                return out
            start = rows[-1][0]

    async def claim_of(self, sample_id: str) -> Claim | None:
        rows = await self._call(
            self.client.xpending_range(self.stream, self.group, sample_id, sample_id, 1)
        )
        if not rows:
            return None
        r = rows[0]
        return Claim(
            owner=r["consumer"],
            idle_s=r["time_since_delivered"] / 1000,
            claims=max(r["times_delivered"] - 1, 0),
        )

    async def sample(self, sample_id: str) -> Sample:
        entries = await self._call(self.client.xrange(self.stream, sample_id, sample_id))
        if not entries:
            raise SampleState(f"no sample {sample_id} in {self.stream}")
        return parse_sample(sample_id, entries[0][1], await self.claim_of(sample_id))

    async def dead_letters(self, limit: int = 500) -> list[DeadLetter]:
        entries = await self._call(self.client.xrevrange(self.dead_stream, count=limit))
        return [self._dead(i, f) for i, f in entries]

    async def dead_letter(self, dead_id: str) -> DeadLetter:
        entries = await self._call(self.client.xrange(self.dead_stream, dead_id, dead_id))
        if not entries:
            raise SampleState(f"no dead letter {dead_id} in {self.dead_stream}")
        return self._dead(*entries[0])

    @staticmethod
    def _dead(entry_id: str, fields: dict[str, str]) -> DeadLetter:
        sample_id = fields.get("dead_sample_id", "")
        return DeadLetter(
            id=entry_id,
            sample_id=sample_id,
            reason=fields.get("dead_reason", ""),
            claims=int(fields.get("dead_claims", "0")),
            dead_at=float(fields.get("dead_at", "0")),
            sample=parse_sample(sample_id, fields),
        )

    async def labels(self) -> list[Label]:
        out: list[Label] = []
        start = "-"
        while page := await self._call(
            self.client.xrange(self.labels_stream, start, "+", count=1000)
        ):
            out += [Label.from_entry(i, f) for i, f in page]
            start = "(" + page[-1][0]
        return out

    async def counts(self) -> Counts:
        return await self._call(
            review_counts(self.client, self.stream, self.group, self.dead_stream)
        )

    # -- acting ----------------------------------------------------------------------------

    async def claim(self, sample_id: str, reviewer: str) -> int:
        """Give the sample to ``reviewer``; returns how many claims it has had (this one
        included). Refuses a sample another reviewer holds, or one no longer pending."""
        await self.refresh()
        res = await self._call(
            self._claim(keys=[self.stream], args=[self.group, HOLDER, reviewer, sample_id])
        )
        self._check(sample_id, res)
        return int(res[1])

    def _check(self, sample_id: str, res: list[Any]) -> None:
        if res[0] == "gone":
            raise SampleState(
                f"sample {sample_id} is not pending: decided, dead-lettered, or never flagged"
            )
        if res[0] == "held":
            raise SampleState(
                f"sample {sample_id} is claimed by {res[1]} (idle {int(res[2]) // 1000} s; it "
                f"returns to the queue after {self.claim_idle_ms // 1000} s idle)"
            )

    async def claim_next(
        self,
        reviewer: str,
        model: str | None = None,
        feature: str | None = None,
        match: Callable[[Summary], bool] | None = None,
    ) -> str | None:
        """The reviewer's own claimed sample if any, else the oldest unclaimed one (matching
        the filters; ``match``: a ``QueueQuery``'s), claimed; None when the queue has nothing
        for them."""
        rows = [
            s
            for s in await self.queue()
            if (model is None or s.model == model)
            and (feature is None or s.top_feature == feature)
            and (match is None or match(s))
        ]
        for s in rows:
            if s.claim is not None and s.claim.owner == reviewer:
                return s.id
        for s in rows:
            if s.claim is not None and s.claim.unclaimed:
                try:
                    await self.claim(s.id, reviewer)
                except SampleState:
                    continue  # another reviewer took it in between
                return s.id
        return None

    async def decide(self, sample_id: str, reviewer: str, decision: str, note: str = "") -> str:
        """Acknowledge the sample and append the label in one step; returns the label's id."""
        if decision not in DECISIONS:
            raise ReviewError(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
        await self.refresh()
        res = await self._call(
            self._decide(
                keys=[self.stream, self.labels_stream],
                args=[
                    self.group,
                    HOLDER,
                    reviewer,
                    sample_id,
                    decision,
                    note,
                    f"{time.time():.3f}",
                    *LABEL_FIELDS,
                ],
            )
        )
        self._check(sample_id, res)
        return str(res[1])


def facet_counts(rows: Sequence[Summary]) -> tuple[Counter[str], Counter[str]]:
    """Samples per model and per top feature."""
    return Counter(r.model for r in rows), Counter(r.top_feature for r in rows)
