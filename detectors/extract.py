"""Extraction: data + method -> one feature row in a bundle (added or replaced)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors import bundle as bundle_io
from detectors import methods
from detectors.activations import ActivationReader, template_ids
from detectors.bundle import Bundle, FeatureSpec, Method, ModelRef
from detectors.errors import BundleError, DataError, ModelError
from detectors.model_store import model_info
from detectors.pooled import pooled_activations
from detectors.transcripts import Message, Transcript, read_jsonl, stratified_sample

log = logging.getLogger(__name__)

PERSONA_PROMPTS = Path(__file__).parent / "data" / "persona_prompts.json"


@dataclass(frozen=True)
class ExtractOptions:
    max_tokens: int = 160
    batch_size: int = 8
    progress: bool = True
    whiten: bool = True
    probe_c: float = 0.003
    limit: int | None = None
    seed: int = 0
    persona_new_tokens: int = 48


def sweep_layers(num_layers: int) -> list[int]:
    """Every third layer from 2, never the last (its output feeds only the final norm)."""
    return list(range(2, num_layers, 3))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def target_bundle(out: Path, reader: ActivationReader, layer: int | None) -> Bundle | None:
    """The bundle at ``out`` if it exists, checked against the model and the requested layer."""
    if not out.exists():
        return None
    existing = bundle_io.load(out)
    existing.check_model(model_info(reader.model_dir))
    if layer is not None and layer != existing.spec.layer:
        raise BundleError(
            out,
            f"holds layer {existing.spec.layer} features; a bundle is one layer, so use "
            f"--layer {existing.spec.layer} (or auto) or write to another --out",
        )
    return existing


def labeled_split(records: Sequence[Transcript], what: object) -> tuple[np.ndarray, np.ndarray]:
    labels = [r.label for r in records]
    if any(lab is None for lab in labels):
        line = labels.index(None) + 1
        raise DataError(what, f"record {line} has no 'label'; this method needs labels 0 and 1")
    y = np.asarray(labels, dtype=bool)
    groups = np.asarray(
        [r.split_group if r.split_group is not None else f"#{i}" for i, r in enumerate(records)]
    )
    return y, groups


def choose_layer(
    x_by_layer: dict[int, np.ndarray], y: np.ndarray, groups: np.ndarray, fit: str
) -> tuple[int, dict[int, float]]:
    sweep = methods.layer_auroc(x_by_layer, y, groups, fit=fit)
    best = max(sweep, key=lambda k: (sweep[k], -k))
    return best, sweep


@dataclass(frozen=True)
class _Found:
    direction: methods.Direction
    layer: int
    params: dict[str, Any]
    source: str


def _pool(
    reader: ActivationReader,
    records: Sequence[Transcript],
    layer: int | None,
    opts: ExtractOptions,
    desc: str = "reading activations",
) -> dict[int, np.ndarray]:
    """Pooled activations at ``layer``, or at every sweep layer when it is None (auto)."""
    layers = [layer] if layer is not None else sweep_layers(reader.num_layers)
    return pooled_activations(
        reader,
        records,
        layers,
        max_tokens=opts.max_tokens,
        batch_size=opts.batch_size,
        progress=opts.progress,
        desc=desc,
    )


def _labeled(
    method: str,
    reader: ActivationReader,
    data: Path | None,
    layer: int | None,
    opts: ExtractOptions,
) -> _Found:
    if data is None:
        raise DataError("--data", f"method {method} needs --data FILE with labeled records")
    records = read_jsonl(data)
    if opts.limit:
        records = stratified_sample(records, opts.limit, opts.seed)
    y, groups = labeled_split(records, data)
    x = _pool(reader, records, layer, opts)
    fit = method if method == "probe" or opts.whiten else "diff-means-raw"
    params: dict[str, Any] = {}
    if len(np.unique(groups)) >= 2:
        chosen, sweep = choose_layer(x, y, groups, fit)
        layer = layer or chosen
        params["cv_auroc"] = round(sweep[layer], 4)
        params["layer_sweep"] = {str(k): round(v, 4) for k, v in sweep.items()}
    elif layer is None:
        raise DataError(data, "--layer auto needs records from at least 2 questions/groups")
    if method == "probe":
        direction = methods.probe(x[layer][y], x[layer][~y], c=opts.probe_c)
        params["c"] = opts.probe_c
    else:
        direction = methods.diff_means(x[layer][y], x[layer][~y], whiten=opts.whiten)
        params["whiten"] = opts.whiten
    params.update(n_pos=int(y.sum()), n_neg=int((~y).sum()), max_tokens=opts.max_tokens)
    return _Found(direction, layer, params, f"{data.name} sha256:{file_digest(data)}")


def _persona(
    reader: ActivationReader, prompts: Path | None, layer: int | None, opts: ExtractOptions
) -> _Found:
    prompts_path = prompts or PERSONA_PROMPTS
    villain, helpful = persona_transcripts(reader, prompts_path, opts)
    y = np.r_[np.ones(len(villain), bool), np.zeros(len(helpful), bool)]
    groups = np.asarray([r.question_id for r in villain + helpful])
    x = _pool(reader, villain + helpful, layer, opts)
    chosen, sweep = choose_layer(x, y, groups, "diff-means-raw")
    layer = layer or chosen
    params = {
        "cv_auroc": round(sweep[layer], 4),
        "n_questions": len(villain),
        "new_tokens": opts.persona_new_tokens,
    }
    source = f"{prompts_path.name} sha256:{file_digest(prompts_path)} (generated by the model)"
    return _Found(methods.persona(x[layer][y], x[layer][~y]), layer, params, source)


def _model_diff(
    reader: ActivationReader,
    base_reader: ActivationReader | None,
    data: Path | None,
    layer: int | None,
    opts: ExtractOptions,
) -> _Found:
    if data is None or base_reader is None:
        raise DataError("--data", "model-diff needs --data FILE and --base MODEL")
    info, base_info = model_info(reader.model_dir), model_info(base_reader.model_dir)
    shape, base_shape = (
        (info["num_layers"], info["hidden_size"]),
        (
            base_info["num_layers"],
            base_info["hidden_size"],
        ),
    )
    if shape != base_shape:
        raise ModelError(
            f"model-diff needs two models of one shape (layers, hidden size): "
            f"{base_info['name']} is {base_shape}, {info['name']} is {shape}"
        )
    records = read_jsonl(data)[: opts.limit or None]
    ft = _pool(reader, records, layer, opts, desc="fine-tuned")
    base = _pool(base_reader, records, layer, opts, desc="base")
    params: dict[str, Any] = {"base": base_info["name"], "n_records": len(records)}
    if layer is None:
        effect = {lay: _paired_effect(ft[lay], base[lay]) for lay in ft}
        layer = max(effect, key=lambda k: effect[k])
        params["layer_sweep_effect"] = {str(k): round(v, 4) for k, v in effect.items()}
    source = f"{data.name} sha256:{file_digest(data)}"
    return _Found(methods.model_diff(ft[layer], base[layer]), layer, params, source)


def _sae(
    reader: ActivationReader, sae_dir: Path | None, latent: int | None, layer: int | None
) -> _Found:
    if sae_dir is None or latent is None:
        raise DataError("--sae", "method sae needs --sae DIR (SAELens layout) and --latent N")
    direction, sae_layer, cfg = methods.sae_latent(sae_dir, latent)
    if cfg["d_in"] != reader.hidden_size:
        raise BundleError(
            sae_dir,
            f"d_in is {cfg['d_in']} but {reader.model_dir.name} has hidden size {reader.hidden_size}",
        )
    if layer is None:
        if sae_layer is None:
            raise DataError("--layer", "the SAE's hook_name names no layer; pass --layer N")
        layer = sae_layer
    elif sae_layer is not None and sae_layer != layer:
        raise BundleError(sae_dir, f"the SAE reads layer {sae_layer} (its hook_name), not {layer}")
    reader.check_layer(layer)
    return _Found(
        direction, layer, {"latent": latent, **cfg}, f"SAE {sae_dir.name} latent {latent}"
    )


def extract(
    method: Method,
    reader: ActivationReader,
    out: Path,
    feature: str,
    layer: int | None,
    *,
    data: Path | None = None,
    sae_dir: Path | None = None,
    latent: int | None = None,
    base_reader: ActivationReader | None = None,
    opts: ExtractOptions = ExtractOptions(),
) -> tuple[Bundle, dict[str, Any]]:
    """Compute one feature and return the bundle with it (not yet saved) and a report.

    ``layer`` None means auto, unless ``out`` exists: a bundle is one layer, so its layer is used.
    """
    existing = target_bundle(out, reader, layer)
    if existing is not None:
        layer = existing.spec.layer
    if layer is not None:
        reader.check_layer(layer)
    if method in ("diff-means", "probe"):
        found = _labeled(method, reader, data, layer, opts)
    elif method == "persona":
        found = _persona(reader, data, layer, opts)
    elif method == "model-diff":
        found = _model_diff(reader, base_reader, data, layer, opts)
    else:
        found = _sae(reader, sae_dir, latent, layer)

    d = found.direction
    spec = FeatureSpec(
        name=feature,
        method=method,
        kind="jumprelu" if d.kind == "jumprelu" else "linear",
        source=found.source,
        params=found.params,
    )
    info = model_info(reader.model_dir)
    base_bundle = existing or bundle_io.empty(
        ModelRef(
            name=str(info["name"]),
            hidden_size=reader.hidden_size,
            num_layers=reader.num_layers,
            architecture=str(info["architecture"]),
        ),
        found.layer,
    )
    result = base_bundle.with_feature(spec, d.vector, d.bias, d.jump_threshold)
    return result, {"feature": feature, "method": method, "layer": found.layer, **found.params}


def _paired_effect(a: np.ndarray, b: np.ndarray) -> float:
    d = (a - b).astype(np.float64)
    mean = d.mean(0)
    unit = mean / max(np.linalg.norm(mean), 1e-12)
    proj = d @ unit
    return (
        float(proj.mean() / max(proj.std(), 1e-12))
        if len(proj) > 1
        else float(np.linalg.norm(mean))
    )


def persona_transcripts(
    reader: ActivationReader, prompts_path: Path, opts: ExtractOptions
) -> tuple[list[Transcript], list[Transcript]]:
    """Generate the model's own answers to each question under a villain and a helpful prompt."""
    try:
        spec = json.loads(prompts_path.read_text())
        questions = list(spec["questions"])
        villains = list(spec["villain_system_prompts"])
        helpers = list(spec["helpful_system_prompts"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            prompts_path,
            f"persona prompts need 'questions', 'villain_system_prompts' and "
            f"'helpful_system_prompts' lists ({type(exc).__name__}: {exc})",
        ) from None
    if not questions or not villains or not helpers:
        raise DataError(prompts_path, "persona prompt lists must not be empty")
    convs: list[tuple[str, str, str]] = []  # (question_id, system, question)
    for i, q in enumerate(questions):
        convs.append((f"q{i}", villains[i % len(villains)], q))
    for i, q in enumerate(questions):
        convs.append((f"q{i}", helpers[i % len(helpers)], q))
    answers = generate(
        reader,
        [[{"role": "system", "content": s}, {"role": "user", "content": q}] for _, s, q in convs],
        opts.persona_new_tokens,
        opts.batch_size,
    )
    out: list[Transcript] = []
    for (qid, system, q), a in zip(convs, answers, strict=True):
        out.append(
            Transcript(
                messages=(
                    Message(role="system", content=system),
                    Message(role="user", content=q),
                    Message(role="assistant", content=a.strip() or "..."),
                ),
                question_id=qid,
            )
        )
    n = len(questions)
    return out[:n], out[n:]


def generate(
    reader: ActivationReader,
    conversations: list[list[dict[str, str]]],
    new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch

    tok = reader.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        seqs = [template_ids(tok, c, add_generation_prompt=True) for c in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        with torch.inference_mode():
            gen = reader.model.generate(
                input_ids=ids.to(reader.device),
                attention_mask=mask.to(reader.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row in gen[:, width:]:
            answers.append(str(tok.decode(row, skip_special_tokens=True)))
    return answers
