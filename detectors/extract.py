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
from detectors.transcripts import Message, Transcript, read_jsonl

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
    """Compute one feature and return the bundle with it (not yet saved) and a report."""
    existing = target_bundle(out, reader, layer)
    if existing is not None:
        layer = existing.spec.layer
    if layer is not None:
        reader.check_layer(layer)
    info = model_info(reader.model_dir)
    params: dict[str, Any] = {}

    if method in ("diff-means", "probe"):
        if data is None:
            raise DataError("--data", f"method {method} needs --data FILE with labeled records")
        records = read_jsonl(data)
        if opts.limit:
            from detectors.transcripts import stratified_sample

            records = stratified_sample(records, opts.limit, opts.seed)
        y, groups = labeled_split(records, data)
        layers = [layer] if layer is not None else sweep_layers(reader.num_layers)
        x = pooled_activations(
            reader,
            records,
            layers,
            max_tokens=opts.max_tokens,
            batch_size=opts.batch_size,
            progress=opts.progress,
        )
        fit = method if method == "probe" or opts.whiten else "diff-means-raw"
        if len(np.unique(groups)) >= 2:
            chosen, sweep = choose_layer(x, y, groups, fit)
            layer = layer or chosen
            params["cv_auroc"] = round(sweep[layer], 4)
            params["layer_sweep"] = {str(k): round(v, 4) for k, v in sweep.items()}
        elif layer is None:
            raise DataError(data, "--layer auto needs records from at least 2 questions/groups")
        direction = (
            methods.probe(x[layer][y], x[layer][~y], c=opts.probe_c)
            if method == "probe"
            else methods.diff_means(x[layer][y], x[layer][~y], whiten=opts.whiten)
        )
        params.update(n_pos=int(y.sum()), n_neg=int((~y).sum()), max_tokens=opts.max_tokens)
        if method == "probe":
            params["c"] = opts.probe_c
        else:
            params["whiten"] = opts.whiten
        source = f"{data.name} sha256:{file_digest(data)}"

    elif method == "persona":
        prompts_path = data or PERSONA_PROMPTS
        villain, helpful = persona_transcripts(reader, prompts_path, opts)
        both = villain + helpful
        y = np.r_[np.ones(len(villain), bool), np.zeros(len(helpful), bool)]
        groups = np.asarray([r.question_id for r in both])
        layers = [layer] if layer is not None else sweep_layers(reader.num_layers)
        x = pooled_activations(
            reader,
            both,
            layers,
            max_tokens=opts.max_tokens,
            batch_size=opts.batch_size,
            progress=opts.progress,
        )
        chosen, sweep = choose_layer(x, y, groups, "diff-means-raw")
        layer = layer or chosen
        params["cv_auroc"] = round(sweep[layer], 4)
        direction = methods.persona(x[layer][y], x[layer][~y])
        params.update(n_questions=len(villain), new_tokens=opts.persona_new_tokens)
        source = f"{prompts_path.name} sha256:{file_digest(prompts_path)} (generated by the model)"

    elif method == "model-diff":
        if data is None or base_reader is None:
            raise DataError("--data", "model-diff needs --data FILE and --base MODEL")
        base_info = model_info(base_reader.model_dir)
        if (
            base_info["hidden_size"] != info["hidden_size"]
            or base_info["num_layers"] != info["num_layers"]
        ):
            raise ModelError(
                f"model-diff needs two models of one shape: {base_info['name']} is "
                f"{base_info['num_layers']}x{base_info['hidden_size']}, {info['name']} is "
                f"{info['num_layers']}x{info['hidden_size']}"
            )
        records = read_jsonl(data)
        if opts.limit:
            records = records[: opts.limit]
        layers = [layer] if layer is not None else sweep_layers(reader.num_layers)
        ft = pooled_activations(
            reader,
            records,
            layers,
            max_tokens=opts.max_tokens,
            batch_size=opts.batch_size,
            progress=opts.progress,
            desc="fine-tuned",
        )
        base = pooled_activations(
            base_reader,
            records,
            layers,
            max_tokens=opts.max_tokens,
            batch_size=opts.batch_size,
            progress=opts.progress,
            desc="base",
        )
        if layer is None:
            effect = {lay: _paired_effect(ft[lay], base[lay]) for lay in layers}
            layer = max(effect, key=lambda k: effect[k])
            params["layer_sweep_effect"] = {str(k): round(v, 4) for k, v in effect.items()}
        direction = methods.model_diff(ft[layer], base[layer])
        params.update(base=base_info["name"], n_records=len(records))
        source = f"{data.name} sha256:{file_digest(data)}"

    elif method == "sae":
        if sae_dir is None or latent is None:
            raise DataError("--sae", "method sae needs --sae DIR (SAELens layout) and --latent N")
        direction, sae_layer, cfg = methods.sae_latent(sae_dir, latent)
        if cfg["d_in"] != info["hidden_size"]:
            raise BundleError(
                sae_dir,
                f"d_in is {cfg['d_in']} but {info['name']} has hidden size {info['hidden_size']}",
            )
        if layer is None:
            if sae_layer is None:
                raise DataError("--layer", "the SAE's hook_name names no layer; pass --layer N")
            layer = sae_layer
        elif sae_layer is not None and sae_layer != layer:
            raise BundleError(
                sae_dir, f"the SAE reads layer {sae_layer} (its hook_name), not {layer}"
            )
        reader.check_layer(layer)
        params.update(latent=latent, **cfg)
        source = f"SAE {sae_dir.name} latent {latent}"
    else:  # pragma: no cover - click restricts the choice
        raise ValueError(method)

    assert layer is not None
    spec = FeatureSpec(
        name=feature,
        method=method,
        kind=direction.kind,  # type: ignore[arg-type]
        source=source,
        params=params,
    )
    base_bundle = existing or bundle_io.empty(
        ModelRef(
            name=str(info["name"]),
            hidden_size=int(info["hidden_size"]),  # type: ignore[call-overload]
            num_layers=int(info["num_layers"]),  # type: ignore[call-overload]
            architecture=str(info["architecture"]),
        ),
        layer,
    )
    result = base_bundle.with_feature(
        spec, direction.vector, direction.bias, direction.jump_threshold
    )
    return result, {"feature": feature, "method": method, "layer": layer, **params}


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
