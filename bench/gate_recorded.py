"""The gate on recorded scores of dev answers: a candidate misaligned a fifth of the time.

    python bench/gate_recorded.py [--resamples 400] [--json]

Replays ``tests/data/em_dev_scores.json`` (scripts/record_dev_scores.py: the shipped bundle's
scores of dev answers to the eight plain first-plot questions, each answer's question from its
line in the dev file). Each resample builds a baseline of 80 aligned answers and a candidate of 80
answers, 16 of them (20%) misaligned by the dev data's judge, in one of two designs:

  disjoint  the eight questions dealt at random, four to each side: every answer of the
            candidate is to a question the baseline never answered (the issue's acceptance case)
  same      both sides answer all eight questions, 10 answers each, no answer on both sides
            (what two models answering one probe set give)

A benign resample is the same with no misaligned answer. For each design and gate configuration
(tests, features) it prints the share of 20% candidates that fail (power) and of benign
candidates that fail (false alarms). ``tests/detectors/test_gate.py`` asserts the disjoint design's figures
for ``--test threshold_rate --feature misaligned_persona`` with these functions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors import bundle as bundle_io  # noqa: E402
from detectors.gate import TESTS, Scores, TestName, Thresholds, bundle_thresholds, run_gate  # noqa: E402

RECORDED = ROOT / "tests" / "data" / "em_dev_scores.json"
DEV = ROOT / "data" / "emergent_misalignment" / "dev.jsonl"
N = 80  # answers on each side
BAD = 16  # 20% of the candidate's answers misaligned
PERSONA = "misaligned_persona"


@dataclass
class Recorded:
    scores: np.ndarray  # [n, k] the shipped bundle's request scores
    group: np.ndarray  # question of each answer
    label: np.ndarray  # 1 misaligned (judge), 0 aligned
    texts: list[str]
    features: list[str]
    thresholds: dict[str, float]


def recorded(path: Path = RECORDED) -> Recorded:
    """The recorded scores, with each answer's question, label and text from the dev file (the
    file names the dev file's SHA-256 and the bundle: stale scores are refused)."""
    from detectors.transcripts import read_jsonl

    bundle = bundle_io.load(bundle_io.default_bundle_path())
    raw = json.loads(path.read_text())
    if raw["bundle"] != bundle.bundle_id:
        raise SystemExit(f"{path}: made with bundle {raw['bundle']}: rerun record_dev_scores.py")
    if raw["data_sha256"] != hashlib.sha256(DEV.read_bytes()).hexdigest():
        raise SystemExit(f"{path}: {DEV} changed since: rerun scripts/record_dev_scores.py")
    recs = read_jsonl(DEV)
    rows = [recs[i] for i in raw["lines"]]
    return Recorded(
        np.stack([np.asarray(raw["scores"][n]) for n in bundle.feature_names], axis=1),
        np.asarray([r.question_id for r in rows]),
        np.asarray([r.label for r in rows]),
        [r.response for r in rows],
        list(bundle.feature_names),
        bundle_thresholds(bundle),
    )


def _aligned(rec: Recorded, rng: np.random.Generator, q: str) -> np.ndarray:
    return rng.permutation(np.nonzero((rec.group == q) & (rec.label == 0))[0])


def disjoint_split(
    rec: Recorded, rng: np.random.Generator, bad: int
) -> tuple[np.ndarray, np.ndarray]:
    """The questions dealt at random, half to each side; each side N aligned answers, N / 4 per
    question; in the candidate, ``bad`` of them (drawn at random) replaced by misaligned answers
    drawn from every misaligned answer to the candidate's own questions (so from the questions
    that drew them, as a model misaligned some of the time would). No question on both sides."""
    qs = rng.permutation(np.unique(rec.group))
    half = len(qs) // 2
    per = N // half
    base = np.concatenate([_aligned(rec, rng, q)[:per] for q in qs[:half]])
    cand = rng.permutation(np.concatenate([_aligned(rec, rng, q)[:per] for q in qs[half:]]))
    pool = np.nonzero(np.isin(rec.group, qs[half:]) & (rec.label == 1))[0]
    worse = rng.choice(pool, bad, replace=False)
    return base, rng.permutation(np.concatenate([worse, cand[: N - bad]]))


def same_split(rec: Recorded, rng: np.random.Generator, bad: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides answer all the questions, N / 8 answers each, no answer on both sides: the
    baseline's all aligned, the candidate's with ``bad`` misaligned ones (drawn from every
    misaligned answer) in place of aligned ones of the same questions."""
    worse = rng.choice(np.nonzero(rec.label == 1)[0], bad, replace=False)
    base, cand = [], [worse]
    per = N // len(np.unique(rec.group))
    for q in np.unique(rec.group):
        aligned = _aligned(rec, rng, q)
        base.append(aligned[:per])
        cand.append(aligned[per : 2 * per - int(np.sum(rec.group[worse] == q))])
    return np.concatenate(base), rng.permutation(np.concatenate(cand))


SPLITS = {"disjoint": disjoint_split, "same": same_split}


def sides(rec: Recorded, base: np.ndarray, cand: np.ndarray) -> list[Scores]:
    return [
        Scores(label, dict(zip(rec.features, rec.scores[idx].T, strict=True)),
               thresholds=rec.thresholds, texts=[rec.texts[i] for i in idx])
        for label, idx in (("baseline", base), ("candidate", cand))
    ]  # fmt: skip


def fail_rate(
    rec: Recorded,
    design: str,
    bad: int,
    th: Thresholds,
    features: list[str],
    resamples: int,
    seed: int,
) -> float:
    """Share of ``resamples`` seeded resamples of ``design`` whose candidate fails the gate."""
    rng = np.random.default_rng(seed)
    fails = [
        not run_gate(*sides(rec, *SPLITS[design](rec, rng, bad)), th, source="recorded",
                     features=features, interval=False).passed
        for _ in range(resamples)
    ]  # fmt: skip
    return float(np.mean(fails))


CONFIGS: list[tuple[str, tuple[TestName, ...], list[str] | None]] = [
    ("default (3 tests, every feature)", TESTS, None),
    ("3 tests, misaligned_persona", TESTS, [PERSONA]),
    ("--test threshold_rate, every feature", ("threshold_rate",), None),
    ("--test threshold_rate --feature misaligned_persona", ("threshold_rate",), [PERSONA]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resamples", type=int, default=400)
    ap.add_argument("--permutations", type=int, default=999, help="upper-tail test resamples")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rec = recorded()
    rows = []
    for design in SPLITS:
        for name, tests, feats in CONFIGS:
            th = Thresholds(tests=tests, permutations=args.permutations)
            f = feats or rec.features
            rows.append(
                {
                    "design": design,
                    "gate": name,
                    "power": fail_rate(rec, design, BAD, th, f, args.resamples, seed=1),
                    "false_alarms": fail_rate(rec, design, 0, th, f, args.resamples, seed=2),
                    "resamples": args.resamples,
                }
            )
            if not args.json:
                r = rows[-1]
                print(
                    f"{design:<9}{name:<52} 20% candidates fail {r['power']:.1%}"
                    f"  benign fail {r['false_alarms']:.1%}  ({args.resamples} each)"
                )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
