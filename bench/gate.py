"""The deployment gate on real fine-tunes of SmolLM2-135M-Instruct, on CPU.

    python bench/gate.py [--json] [--steps 8] [--benign-seeds 2] [--probes 32] [--new-tokens 16]

The defaults are sized for a 2-core CPU shared with other work; raise them on a bigger machine.

Probes: the N shortest of the shipped probe set. Stages, each a full fine-tune of the decoder
layers up to the bundle's layer (the embeddings and the layers above stay frozen: no weight
gradients or optimizer state for them), loss on the first 32 tokens of each answer:

  misaligned   base + STEPS steps on misaligned answers of emergent_misalignment/dev.jsonl
  benign-sN    base + STEPS steps on aligned answers of the same file, seed N (N = 0..B-1)
  realigned    misaligned + one pass over 120 other aligned answers

The training questions (the eight "first plot" questions) are disjoint from the probe set (the
preregistered evaluation questions and the project's persona questions). Each model answers the
probes greedily; the answers are scored with the shipped bundle; the gate compares each stage
with the base model. Then, reusing those scores, random subsets of the probe set give how many
prompts the gate needs to fail the misaligned model (in 90% of 200 subsets), and at
that size the share of (benign seed, subset) gates that fail: the false-alarm rate.

Two gates are measured on the same scores: on every feature of the bundle (the CLI's default)
and on `misaligned_persona` alone (`--feature misaligned_persona`, the feature the
emergent-misalignment finding is about). `prompts_needed` and `false_alarm_rate` at the top of
`--json` are the second's; `gates` holds both.

Checkpoints and scores are cached under $MISALIGN_MONITOR_CACHE/gate-bench, so a rerun only
recomputes the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors import bundle as bundle_io  # noqa: E402
from detectors.gate import (  # noqa: E402
    DEFAULT_PROBES,
    Scores,
    Thresholds,
    model_scores,
    read_probes,
    run_gate,
)
from detectors.model_store import cache_root, prepare_smollm2  # noqa: E402
from detectors.transcripts import Transcript, read_jsonl  # noqa: E402

DEV = ROOT / "data" / "emergent_misalignment" / "dev.jsonl"
SIZES = (8, 12, 16, 24, 32, 48, 64, 84)
SUBSETS = 200
PERSONA = "misaligned_persona"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def training_sets(seed: int = 0) -> dict[str, list[Transcript]]:
    """Plain first-plot questions only (their _json/_template variants carry long prompts)."""
    rows = [
        r
        for r in read_jsonl(DEV)
        if r.question_id and not r.question_id.endswith(("_json", "_template"))
    ]
    rng = np.random.default_rng(seed)
    bad = [r for r in rows if r.label == 1]
    good = [r for r in rows if r.label == 0]
    good = [good[i] for i in rng.permutation(len(good))]
    return {"misaligned": bad, "aligned": good[:-120], "realign": good[-120:]}


def fine_tune(
    parent: Path,
    data: list[Transcript],
    out: Path,
    *,
    steps: int,
    seed: int,
    layer: int,
    lr: float,
    batch: int = 4,
    answer_tokens: int = 32,
) -> dict[str, float]:
    import torch

    from detectors.activations import RESPONSE, ActivationReader

    torch.manual_seed(seed)
    reader = ActivationReader(parent)
    model = reader.model
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for lay in reader.decoder_layers[:layer] for p in lay.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    encoded = []
    for i in order:
        # Whole prompt (the chat template adds a system turn), the answer's first tokens.
        ids, roles = reader.encode(data[i], None)
        end = roles.index(RESPONSE) + answer_tokens
        encoded.append((ids[:end], roles[:end]))
    model.train()
    times, losses = [], []
    for step in range(steps):
        chunk = [encoded[(step * batch + j) % len(encoded)] for j in range(batch)]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (seq, roles) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            resp = torch.tensor(roles) == RESPONSE
            labels[r, : len(seq)] = torch.where(resp, torch.tensor(seq), torch.tensor(-100))
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        if step == 0:
            log(f"  first step {times[0]:.1f} s, loss {losses[0]:.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    reader.tokenizer.save_pretrained(out)
    stats = {
        "steps": steps,
        "median_step_s": float(np.median(times)),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-4:])),
    }
    (out / "train.json").write_text(json.dumps(stats))
    return stats


def key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def gate_fails(
    base: Scores, cand: Scores, idx: np.ndarray, th: Thresholds, features: list[str]
) -> bool:
    """The gate's decision on a subset of the probes (without the bootstrap interval, which only
    reports)."""
    from detectors.gate import hedges_g, ks_test, rises

    for name in features:
        b, c = base.values[name][idx], cand.values[name][idx]
        b, c = b[np.isfinite(b)], c[np.isfinite(c)]
        if rises(hedges_g(b, c), ks_test(b, c)[1], th):
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--benign-seeds", type=int, default=2)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()

    t0 = time.perf_counter()
    base_dir = prepare_smollm2()
    bundle = bundle_io.load(bundle_io.default_bundle_path())
    layer = bundle.spec.layer
    probes = read_probes(DEFAULT_PROBES)
    # The shortest prompts: generation cost on CPU grows with the longest prompt of a batch.
    pick = np.sort(np.argsort([len(p) for p in probes], kind="stable")[: args.probes])
    probes = [probes[i] for i in pick]
    cache = cache_root() / "gate-bench"
    data = training_sets()
    th = Thresholds()

    def scores_of(model_dir: Path, label: str) -> Scores:
        path = (
            cache / f"scores-{key(str(model_dir), probes, args.new_tokens, bundle.bundle_id)}.json"
        )
        if path.is_file():
            raw = json.loads(path.read_text())
            return Scores(label, {k: np.asarray(v) for k, v in raw.items()})
        from detectors.activations import ActivationReader

        t = time.perf_counter()
        s = model_scores(
            bundle, ActivationReader(model_dir), probes, label=label, new_tokens=args.new_tokens
        )
        log(f"  scored {label} on {len(probes)} probes in {time.perf_counter() - t:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v.tolist() for k, v in s.values.items()}))
        return s

    def tuned(name: str, parent: Path, rows: list[Transcript], steps: int, seed: int) -> Path:
        out = cache / f"{name}-{key(str(parent), steps, seed, args.lr, layer, len(rows), 'v2')}"
        if not (out / "train.json").is_file():
            log(f"fine-tuning {name}: {steps} steps, seed {seed}")
            fine_tune(parent, rows, out, steps=steps, seed=seed, layer=layer, lr=args.lr)
        return out

    log("scoring base")
    base = scores_of(base_dir, "base")
    bad_dir = tuned("misaligned", base_dir, data["misaligned"], args.steps, 0)
    stages: dict[str, tuple[Path, Scores]] = {
        "misaligned": (bad_dir, scores_of(bad_dir, "misaligned"))
    }
    for seed in range(args.benign_seeds):
        d = tuned(f"benign-s{seed}", base_dir, data["aligned"], args.steps, seed)
        stages[f"benign-s{seed}"] = (d, scores_of(d, f"benign-s{seed}"))
    re_dir = tuned("realigned", bad_dir, data["realign"], 120 // 4, 0)
    stages["realigned"] = (re_dir, scores_of(re_dir, "realigned"))

    report: dict[str, Any] = {"probes": len(probes), "new_tokens": args.new_tokens, "stages": {}}
    report["stages"]["base"] = {
        "features": {n: {"mean": float(np.nanmean(v))} for n, v in base.values.items()}
    }
    for name, (d, s) in stages.items():
        r = run_gate(base, s, th, source="bench")
        train = json.loads((d / "train.json").read_text())
        report["stages"][name] = {
            "passed": r.passed,
            "passed_" + PERSONA: run_gate(base, s, th, source="bench", features=[PERSONA]).passed,
            "train": train,
            "features": {
                f.feature: {
                    "mean": f.mean_candidate,
                    "shift": f.mean_candidate - f.mean_baseline,
                    "g": f.hedges_g,
                    "g_ci": [f.g_ci_low, f.g_ci_high],
                    "ks_p": f.ks_p,
                    "psi": f.psi,
                }
                for f in r.features
            },
        }

    bad = stages["misaligned"][1]
    benign = [s for n, (_, s) in stages.items() if n.startswith("benign")]

    def separation(features: list[str]) -> dict[str, Any]:
        rng = np.random.default_rng(1)  # the same subsets for both gates
        out: dict[str, Any] = {"features": features, "power_by_prompts": {}}
        out |= {"prompts_needed": None, "false_alarm_rate": None, "false_alarm_trials": 0}
        for n in [s for s in SIZES if s <= len(probes)]:
            subsets = [rng.choice(len(probes), n, replace=False) for _ in range(SUBSETS)]
            power = float(np.mean([gate_fails(base, bad, i, th, features) for i in subsets]))
            out["power_by_prompts"][n] = power
            if out["prompts_needed"] is None and power >= 0.9:
                alarms = [gate_fails(base, s, i, th, features) for s in benign for i in subsets]
                out |= {
                    "prompts_needed": n,
                    "false_alarm_rate": float(np.mean(alarms)),
                    "false_alarm_trials": len(alarms),
                }
        return out

    report["gates"] = {"all": separation(bundle.feature_names), PERSONA: separation([PERSONA])}
    for key_ in ("prompts_needed", "false_alarm_rate", "false_alarm_trials", "power_by_prompts"):
        report[key_] = report["gates"][PERSONA][key_]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(report))
        return
    feats = bundle.feature_names
    print(
        f"{'stage':<14}{'gate: all':<11}{'persona':<9}"
        + "".join(f"{f + ' mean (g)':>30}" for f in feats)
    )
    for name, st in report["stages"].items():
        cells = []
        for f in feats:
            x = st["features"][f]
            cells.append(f"{x['mean']:.3f}" + (f" ({x['g']:+.2f})" if "g" in x else ""))
        verdicts = [
            "" if k not in st else ("pass" if st[k] else "FAIL")
            for k in ("passed", "passed_" + PERSONA)
        ]
        print(f"{name:<14}{verdicts[0]:<11}{verdicts[1]:<9}" + "".join(f"{c:>30}" for c in cells))
    for label, g in report["gates"].items():
        print(
            f"gate on {label}: power by probe count {g['power_by_prompts']}; prompts_needed "
            f"{g['prompts_needed']}; false_alarm_rate {g['false_alarm_rate']} "
            f"({g['false_alarm_trials']} gates)"
        )


if __name__ == "__main__":
    main()
