"""Token texts and shading for the sample view's heat map.

The sidecar stores each token as the tokenizer's vocabulary string (byte-level BPE: ``Ġ`` for a
space, ``Ċ`` for a newline); here they become readable text again, and each token gets a shade
from 0 to 10 for one feature: 10 at or above the feature's threshold (the sample's highest score
for a feature without one), 0 at or below the sample's 10th percentile.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

from detectors.roles import RESPONSE
from review.store import Sample

LEVELS = 10
# Chat-template markers (<|im_start|>, <|eot_id|>): shown as they are, dimmed.
SPECIAL = re.compile(r"^<\|[^|]+\|>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode table, which byte-level BPE vocabularies use."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_texts(tokens: list[str]) -> list[tuple[str, bool]]:
    """(text, special) per token; a character split over tokens shows on the token ending it."""
    table = _byte_decoder()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for tok in tokens:
        if tok and all(ch in table for ch in tok) and not SPECIAL.match(tok):
            out.append((decoder.decode(bytes(table[ch] for ch in tok)), False))
        else:
            out.append((decoder.decode(b"", final=True) + tok, True))
            decoder.reset()
    return out


@dataclass(frozen=True)
class Token:
    text: str
    special: bool
    score: float | None
    level: int  # 0..LEVELS, -1 without a score
    over: bool  # at or above the feature's threshold


@dataclass(frozen=True)
class HeatMap:
    feature: str
    threshold: float | None
    low: float
    high: float
    prompt: list[Token]
    response: list[Token]


def heat_map(sample: Sample, feature: str) -> HeatMap | None:
    """The sample's tokens shaded by ``feature``; None when the sample carries no token scores."""
    if sample.tokens is None or sample.problem or feature not in sample.tokens.scores:
        return None
    scores = np.array(
        [np.nan if s is None else s for s in sample.tokens.scores[feature]], np.float64
    )
    threshold = next((f.threshold for f in sample.features if f.name == feature), None)
    finite = scores[np.isfinite(scores)]
    low = float(np.percentile(finite, 10)) if len(finite) else 0.0
    high = threshold if threshold is not None else float(finite.max()) if len(finite) else low
    if high <= low:
        high = low + 1e-6
    if sample.token_text is not None:
        texts = token_texts(sample.token_text)
    else:
        texts = [(f"[{t}]", True) for t in sample.tokens.token_ids]
    prompt: list[Token] = []
    response: list[Token] = []
    for (text, special), s, role in zip(texts, scores, sample.tokens.roles, strict=True):
        ok = bool(np.isfinite(s))
        level = round(LEVELS * min(max((s - low) / (high - low), 0.0), 1.0)) if ok else -1
        over = ok and threshold is not None and s >= threshold
        tok = Token(text, special, float(s) if ok else None, level, over)
        (response if role == RESPONSE else prompt).append(tok)
    return HeatMap(feature, threshold, low, high, prompt, response)
