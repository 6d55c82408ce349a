"""Redaction of flagged samples before they are queued: e-mail addresses, phone numbers, API-key-like
strings and any patterns the operator adds.

On by default (setting ``redact``): a flagged conversation sits in Redis for days and is shown to
reviewers, and the score that flagged it never depended on the exact address or number. What
is redacted: ``prompt_text`` and ``response_text`` (the match becomes ``[redacted:NAME]``), and
every token whose text overlaps a match, in ``token_text`` (``[redacted]``) and in
``tokens.token_ids`` (``-1``), since ids decode back to the text with the model's tokenizer. Token
scores and positions stay, so the heat map keeps its shape.

Every built-in pattern runs in time linear in the text, whatever the text: a pattern that could
start a failing scan at every position of a long run (``x------...`` with no ``@``) costs the
square of the run. The e-mail pattern is therefore not a regular expression search but a scan
from each ``@`` (``Email``); the phone and key patterns start only at a boundary and scan a
bounded or matching run. Operator patterns (``redact_patterns``) are the operator's own: they run
over the same bounded text (``service.monitor``, ``max_tokens_per_request`` tokens at most) and
off the event loop, but a nested quantifier of theirs can still be slow.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any, Protocol

from service.flagged_sample import FlaggedSample


class Finder(Protocol):
    def spans(self, text: str) -> list[tuple[int, int]]:
        """Non-overlapping matches, left to right."""
        ...


class Regex:
    def __init__(self, pattern: str) -> None:
        self.rx = re.compile(pattern)

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self.rx.finditer(text)]


class Email:
    r"""``LOCAL@DOMAIN`` where LOCAL is ``[A-Za-z0-9._%+-]+`` and DOMAIN is
    ``[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}``: the matches ``re.finditer`` would give for
    ``LOCAL@DOMAIN``, found in linear time.

    The regular expression searched from every position scans each run of local-part characters
    to its end before failing, from every start in it: 4.4 s for 80,000 dashes. Here each ``@``
    takes the local-part characters before it (back to the previous ``@`` or the previous match,
    which it cannot cross) and the domain after it (up to the next ``@``, which it cannot
    cross), so every character is looked at a bounded number of times.
    """

    LOCAL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
    DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

    def spans(self, text: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        floor = 0  # the left end no match may start before: past the last match and last '@'
        at = text.find("@")
        while at >= 0:
            run = text[floor:at]
            start = at - (len(run) - len(run.rstrip(self.LOCAL)))
            m = self.DOMAIN.match(text, at + 1) if start < at else None
            if m is not None:
                out.append((start, m.end()))
            floor = m.end() if m is not None else at + 1
            at = text.find("@", floor)
        return out


# Built in, by name; `redact_builtin` picks among them, `redact_patterns` adds more.
BUILTIN: dict[str, str | Finder] = {
    "email": Email(),
    # +44 20 7946 0958, (415) 555-0132, 415-555-0132, 0151 496 0730, 4155550132: three or more
    # digit groups, or a bracketed area code; it errs on the side of redacting (a list of years
    # "2023 2024 2025" matches too).
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?\d{1,4}|\(\d{1,4}\)[ .-]?\d{2,4}|\d{3,4})"
    r"(?:[ .-]?\d{2,4}){1,3}(?![\w])",
    # Vendor key prefixes, `key = value` assignments, and long unbroken runs of key characters.
    # One word boundary in front of all of them: a position that is not one fails at once.
    "api_key": r"\b(?:(?:sk|pk|rk)[-_][A-Za-z0-9_-]{12,}|(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{16,}"
    r"|AKIA[0-9A-Z]{16}\b|AIza[0-9A-Za-z_-]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|(?i:(?:api[_-]?key|secret|token|password|passwd)\b\s*[:=]\s*[^\s,;]+)"
    r"|[A-Za-z0-9+/_-]{32,}={0,2})",
}

# Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) spell a space and a newline this way; one
# character each, so offsets in the joined token text stay offsets into the tokens.
_BPE_CHARS = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "})


class Redactor:
    def __init__(self, patterns: Mapping[str, str | Finder]) -> None:
        self.patterns = {
            name: Regex(p) if isinstance(p, str) else p for name, p in patterns.items()
        }

    def text(self, text: str) -> str:
        for name, finder in self.patterns.items():
            spans = finder.spans(text)
            if spans:
                parts, last, mark = [], 0, f"[redacted:{name}]"
                for s, e in spans:
                    parts += [text[last:s], mark]
                    last = e
                parts.append(text[last:])
                text = "".join(parts)
        return text

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [span for finder in self.patterns.values() for span in finder.spans(text)]

    def sample(self, sample: FlaggedSample) -> FlaggedSample:
        """``sample`` with matches removed from its text, and the tokens that overlap a match
        replaced by ``[redacted]`` (their ids by -1)."""
        update: dict[str, Any] = {
            key: self.text(value)
            for key in ("prompt_text", "response_text")
            if (value := getattr(sample, key)) is not None
        }
        tokens = sample.token_text
        if tokens:
            hit = self._hit_tokens(tokens)
            if hit:
                update["token_text"] = [
                    "[redacted]" if i in hit else t for i, t in enumerate(tokens)
                ]
                ids = sample.tokens.token_ids if sample.tokens is not None else None
                if ids is not None and len(ids) == len(tokens):
                    update["tokens"] = sample.tokens.model_copy(  # type: ignore[union-attr]
                        update={"token_ids": [-1 if i in hit else t for i, t in enumerate(ids)]}
                    )
        return sample.model_copy(update=update)

    def _hit_tokens(self, tokens: list[str]) -> set[int]:
        starts, pos = [], 0
        for t in tokens:
            starts.append(pos)
            pos += len(t)
        joined = "".join(tokens).translate(_BPE_CHARS)
        hit: set[int] = set()
        for s, e in self.spans(joined):
            # tokens overlapping [s, e): a leading space marker belongs to the token, not the match
            i = max(0, bisect_right(starts, s) - 1)
            while i < len(tokens) and starts[i] < e:
                hit.add(i)
                i += 1
        return hit


def from_settings(enabled: bool, builtin: list[str], extra: dict[str, str]) -> Redactor | None:
    if not enabled:
        return None
    return Redactor({**{n: BUILTIN[n] for n in builtin}, **extra})
