"""The Redis keys of flagged samples, all in one Redis Cluster hash slot.

Each Lua script touches several of these keys in one call (append: the stream, the request's
dedup key and the dead letters; reclaim: the stream and the dead letters; decide: the stream and
the labels). A Redis Cluster refuses a script whose keys lie in different slots (CROSSSLOT), so
the defaults share the hash tag ``{flagged}``: only the text between the braces decides the slot.
Keys renamed from ``misalign:flagged``, ``misalign:flagged:dead`` and ``misalign:labels``
(docs/redis.md says how to move an existing deployment).
"""

from __future__ import annotations

from redis.crc import key_slot

FLAGGED_STREAM = "misalign:{flagged}"
DEAD_LETTER_STREAM = "misalign:{flagged}:dead"
LABELS_STREAM = "misalign:{flagged}:labels"


def dedup_key(stream: str, request_id: str) -> str:
    """Set once per request id beside the append; it carries the stream's hash tag."""
    return f"{stream}:seen:{request_id}"


def slot_problem(stream: str, dead_letter_stream: str, labels_stream: str) -> str | None:
    """Why these keys cannot serve a Redis Cluster, or None when every script stays in one slot."""
    names = {
        "stream": stream,
        "its dedup keys (stream + ':seen:<request id>')": dedup_key(stream, "<request id>"),
        "dead_letter_stream": dead_letter_stream,
        "review.labels_stream": labels_stream,
    }
    slots = {name: key_slot(key.encode()) for name, key in names.items()}
    if len(set(slots.values())) == 1:
        return None
    apart = [name for name, slot in slots.items() if slot != slots["stream"]]
    return (
        f"a Redis Cluster needs the flagged-sample keys in one hash slot, but {', '.join(apart)} "
        f"hash apart from stream {stream!r}: give them one hash tag, e.g. {FLAGGED_STREAM}, "
        f"{DEAD_LETTER_STREAM}, {LABELS_STREAM}"
    )
