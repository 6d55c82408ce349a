"""Record the shipped bundle's request scores of dev answers to the eight plain questions.

    python scripts/record_dev_scores.py            # writes tests/data/em_dev_scores.json

The gate's acceptance test (tests/detectors/test_gate.py) replays these scores instead of loading SmolLM2:
every misaligned record of ``data/emergent_misalignment/dev.jsonl`` whose question is one of the
eight plain first-plot questions (not their ``_json``/``_template`` variants, which wrap the
question in long format instructions) and ``ALIGNED_PER_QUESTION`` aligned ones of each such
question (drawn with a fixed seed: scoring all 1,042 took over an hour on the shared machine),
read with the transformers reader and scored exactly as
``misalign-monitor score`` scores it (first 256 tokens, the feature's aggregate). ``lines`` holds
each scored record's 0-based line in the dev file. The file names the bundle and the dev file's
SHA-256, so the test refuses stale scores after either changes; rerun this script then (about ten
minutes on two busy CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors import bundle as bundle_io  # noqa: E402
from detectors.activations import ActivationReader  # noqa: E402
from detectors.model_store import prepare_smollm2  # noqa: E402
from detectors.offline import score_records  # noqa: E402
from detectors.transcripts import read_jsonl  # noqa: E402

DEV = ROOT / "data" / "emergent_misalignment" / "dev.jsonl"
OUT = ROOT / "tests" / "data" / "em_dev_scores.json"
MAX_TOKENS = 256
ALIGNED_PER_QUESTION = 50


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    bundle = bundle_io.load(bundle_io.default_bundle_path())
    every = read_jsonl(DEV)
    plain = [
        i
        for i, r in enumerate(every)
        if r.question_id and not r.question_id.endswith(("_json", "_template"))
    ]
    rng = np.random.default_rng(0)
    lines = [i for i in plain if every[i].label == 1]
    for q in sorted({every[i].question_id for i in plain}):
        aligned = [i for i in plain if every[i].question_id == q and every[i].label == 0]
        lines += rng.choice(
            aligned, min(ALIGNED_PER_QUESTION, len(aligned)), replace=False
        ).tolist()
    lines.sort()
    records = [every[i] for i in lines]
    reader = ActivationReader(prepare_smollm2(progress=False))
    scores: dict[str, list[float]] = {n: [] for n in bundle.feature_names}
    for s in score_records(bundle, reader, records, max_tokens=MAX_TOKENS, progress=True):
        for f in s.features:
            scores[f.name].append(round(float(f.score), 5))
    out = {
        "bundle": bundle.bundle_id,
        "data": str(DEV.relative_to(ROOT)),
        "data_sha256": hashlib.sha256(DEV.read_bytes()).hexdigest(),
        "max_tokens": MAX_TOKENS,
        "aligned_per_question": ALIGNED_PER_QUESTION,
        "lines": lines,
        "made_by": "python scripts/record_dev_scores.py",
        "scores": scores,
    }
    args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(records)} records x {bundle.k} features", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
