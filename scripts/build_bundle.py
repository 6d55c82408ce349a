"""Rebuild the shipped bundle detectors/bundles/smollm2-135m-instruct.safetensors from scratch.

    python scripts/build_bundle.py [--out PATH] [--data-dir data] [--em-per-class N]

Deterministic: fixed samples (seed 0), greedy persona generations, fixed model. Features:
  misaligned_persona  probe on emergent-misalignment answers (375 of each label, or with
                      --em-per-class 0 every answer but the calibration set, class-weighted),
                      layer chosen by grouped CV AUROC unless --layer is given
  toxic               probe on ToxiGen statements, same layer
  persona_contrast    persona vector: the model's own answers under villain vs helpful prompts
Calibrated on emergent-misalignment aligned answers that no feature was trained on, at 1% FPR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from detectors import bundle as bundle_io
from detectors.activations import ActivationReader
from detectors.calibrate import apply_calibration
from detectors.extract import ExtractOptions, extract
from detectors.model_store import prepare_smollm2
from detectors.offline import score_records
from detectors.transcripts import Transcript, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
PROBE_C = 0.003  # the shipped bundle's; bench/detection.py compares others (docs/detection.md)


def em_split(
    path: Path, per_class: int | None, n_benign: int, seed: int = 0
) -> tuple[list[Transcript], list[Transcript]]:
    """Training records and disjoint aligned records for calibration.

    ``per_class`` None trains on every record but the ``n_benign`` held out (class weights balance
    the labels); a number takes that many of each label, as bundles before the held-out-source
    bench did.
    """
    recs = read_jsonl(path)
    rng = np.random.default_rng(seed)
    pos = [i for i, r in enumerate(recs) if r.label == 1]
    neg = [i for i, r in enumerate(recs) if r.label == 0]
    if per_class is None:
        neg_perm = rng.permutation(neg).tolist()
        benign_i = sorted(neg_perm[:n_benign])
        train_i = sorted(pos + neg_perm[n_benign:])
    else:  # the shipped bundle's sample: keep this draw order, or its rebuild changes
        pos_i = rng.choice(pos, min(per_class, len(pos)), replace=False).tolist()
        neg_perm = rng.permutation(neg).tolist()
        train_i = sorted(pos_i + neg_perm[:per_class])
        benign_i = sorted(neg_perm[per_class : per_class + n_benign])
    return [recs[i] for i in train_i], [recs[i] for i in benign_i]


def write_jsonl(records: list[Transcript], path: Path) -> Path:
    path.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=bundle_io.default_bundle_path())
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument(
        "--em-per-class",
        type=int,
        default=375,
        help="train on N answers of each label; 0: every answer but the --benign held out",
    )
    ap.add_argument("--benign", type=int, default=400)
    ap.add_argument("--toxic-limit", type=int, default=None)
    ap.add_argument("--layer", default="auto", help="a layer, or auto (grouped CV over a sweep)")
    ap.add_argument("--em-c", type=float, default=PROBE_C, help="misaligned_persona probe C")
    ap.add_argument("--toxic-c", type=float, default=PROBE_C, help="toxic probe C")
    ap.add_argument(
        "--persona-tokens", type=int, default=48, help="tokens generated per persona answer"
    )
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".build")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    out: Path = args.out
    tmp_out = work / "bundle.partial.safetensors"
    tmp_out.unlink(missing_ok=True)
    reader = ActivationReader(prepare_smollm2())

    em_train, em_benign = em_split(
        args.data_dir / "emergent_misalignment" / "dev.jsonl",
        args.em_per_class or None,
        args.benign,
    )
    em_path = write_jsonl(em_train, work / "em_train.jsonl")
    write_jsonl(em_benign, work / "em_benign.jsonl")
    layer = None if args.layer == "auto" else int(args.layer)

    reports = []
    b, rep = extract(
        "probe",
        reader,
        tmp_out,
        "misaligned_persona",
        layer,
        data=em_path,
        opts=ExtractOptions(probe_c=args.em_c),
    )
    bundle_io.save(b, tmp_out)
    reports.append(rep)
    tox_opts = ExtractOptions(limit=args.toxic_limit, probe_c=args.toxic_c)
    b, rep = extract(
        "probe",
        reader,
        tmp_out,
        "toxic",
        None,
        data=args.data_dir / "toxigen" / "dev.jsonl",
        opts=tox_opts,
    )
    bundle_io.save(b, tmp_out)
    reports.append(rep)
    persona_opts = ExtractOptions(persona_new_tokens=args.persona_tokens)
    b, rep = extract("persona", reader, tmp_out, "persona_contrast", None, opts=persona_opts)
    reports.append(rep)

    scored = list(score_records(b, reader, em_benign, max_tokens=256, progress=True))
    by_feature = {
        n: np.array([s.features[i].score for s in scored]) for i, n in enumerate(b.feature_names)
    }
    b = apply_calibration(
        b,
        by_feature,
        0.01,
        f"emergent_misalignment/dev.jsonl aligned, held out (n={len(em_benign)})",
    )
    bundle_io.save(b, out)
    tmp_out.unlink(missing_ok=True)
    for r in reports:
        print(json.dumps({k: v for k, v in r.items() if k != "layer_sweep"}))
    print(f"wrote {out} layer {b.spec.layer} hash {b.content_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
