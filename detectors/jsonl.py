"""JSON Lines, read one way for every file the tools take (transcripts, recorded scores, probe
sets, review labels): blank lines skipped, and every error a ``DataError`` naming the file and
the line. Each caller checks the shape of its own objects."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from detectors.errors import DataError


def read_lines(path: Path, what: str) -> list[str]:
    """The file's lines; ``what`` names the file's role in the error ("cannot read labels")."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(path, f"cannot read {what} (file not found)") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(path, f"cannot read {what} ({exc.strerror})") from None


def parsed(lines: Iterable[str], source: object) -> Iterator[tuple[int, Any]]:
    """``(line number, the decoded JSON value)`` for each line that is not blank."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                source, f"not valid JSON ({exc.msg} at column {exc.colno})", lineno
            ) from None


def objects(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """``parsed`` over the lines of ``path``."""
    return parsed(read_lines(path, what), path)
