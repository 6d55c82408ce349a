"""Redaction of flagged samples before they are queued: e-mail addresses, phone numbers, API-key-like
strings and any patterns the operator adds.

On by default (setting ``redact``): a flagged conversation sits in Redis for days and is shown to
reviewers, and the score that flagged it never depended on the exact address or number. What
is redacted: ``prompt_text`` and ``response_text`` (the match becomes ``[redacted:NAME]``), and
every token whose text overlaps a match, in ``token_text`` (``[redacted]``) and in
``tokens.token_ids`` (``-1``), since ids decode back to the text with the model's tokenizer. Token
scores and positions stay, so the heat map keeps its shape.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import Any

# Built in, by name; `redact_builtin` picks among them, `redact_patterns` adds more.
BUILTIN: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    # +44 20 7946 0958, (415) 555-0132, 415-555-0132, 0151 496 0730, 4155550132: three or more
    # digit groups, or a bracketed area code; it errs on the side of redacting (a list of years
    # "2023 2024 2025" matches too).
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?\d{1,4}|\(\d{1,4}\)[ .-]?\d{2,4}|\d{3,4})"
    r"(?:[ .-]?\d{2,4}){1,3}(?![\w])",
    # Vendor key prefixes, `key = value` assignments, and long unbroken runs of key characters.
    "api_key": r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_-]{12,}|\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{16,}"
    r"|\bAKIA[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{30,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|(?i:\b(?:api[_-]?key|secret|token|password|passwd)\b\s*[:=]\s*[^\s,;]+)"
    r"|\b[A-Za-z0-9+/_-]{32,}={0,2}",
}

# Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) spell a space and a newline this way; one
# character each, so offsets in the joined token text stay offsets into the tokens.
_BPE_CHARS = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "})


class Redactor:
    def __init__(self, patterns: dict[str, str]) -> None:
        self.patterns = {name: re.compile(p) for name, p in patterns.items()}

    def text(self, text: str) -> str:
        for name, rx in self.patterns.items():
            text = rx.sub(f"[redacted:{name}]", text)
        return text

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for rx in self.patterns.values() for m in rx.finditer(text)]

    def sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``sample`` (as Monitor builds it) with matches removed."""
        out = dict(sample)
        for key in ("prompt_text", "response_text"):
            if isinstance(out.get(key), str):
                out[key] = self.text(out[key])
        tokens = out.get("token_text")
        if isinstance(tokens, list) and tokens:
            hit = self._hit_tokens(tokens)
            if hit:
                out["token_text"] = ["[redacted]" if i in hit else t for i, t in enumerate(tokens)]
                ids = out.get("tokens", {}).get("token_ids")
                if isinstance(ids, list) and len(ids) == len(tokens):
                    out["tokens"] = {
                        **out["tokens"],
                        "token_ids": [-1 if i in hit else t for i, t in enumerate(ids)],
                    }
        return out

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
