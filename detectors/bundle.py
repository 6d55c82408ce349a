"""The direction bundle: one ``.safetensors`` file per (model, layer).

Tensors::

    directions      [k, d] float32   one row per feature (an SAE latent's encoder column)
    bias            [k]    float32   added to the projection (probe intercept, SAE encoder bias)
    jump_threshold  [k]    float32   JumpReLU threshold for SAE latents, 0 for linear features

A token's score for feature i is ``x · directions[i] + bias[i]`` where ``x`` is the residual
stream after decoder layer ``layer``; for a ``jumprelu`` feature it is that value where it exceeds
``jump_threshold[i]`` and 0 elsewhere. The metadata holds a JSON ``spec`` (model, layer, features,
calibration), the format version and a content hash over spec and tensors, which every score,
metric and flagged sample carries.

Two optional parts, absent from (and so not changing the hash of) a single-layer bundle:

* a feature's ``layer``: its direction reads the residual after that decoder layer instead of the
  bundle's ``layer``; the tap projects after each tapped layer into its columns of one buffer, so a
  token still carries k numbers;
* a feature's ``head``: its request score is ``bias + sum_j weights[j] * pooled[inputs[j]]``, the
  feature's own aggregation applied to each input feature's token scores (a logistic probe's logit
  over several pooled projections). The head lives in the spec, so the content hash covers it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from detectors.errors import BundleError

FORMAT = "misalign-monitor/bundle"
FORMAT_VERSION = 1
HOOK_POINT = "resid_post"  # residual stream after decoder layer `layer` (hidden + residual)
TENSORS = ("directions", "bias", "jump_threshold")

Method = Literal["diff-means", "probe", "persona", "sae", "model-diff"]
Span = Literal["prompt", "response", "all"]
Reduce = Literal["mean", "max_rolling_mean", "softmax"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    name: str
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    architecture: str = "LlamaForCausalLM"


class Aggregation(_Strict):
    """How token scores become one request score."""

    span: Span = "response"
    reduce: Reduce = "mean"
    window: int = Field(default=8, ge=1)  # tokens per rolling mean, for max_rolling_mean
    # softmax pooling: token scores weighted by softmax(score / temperature), in score units
    temperature: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _temperature_with_softmax(self) -> Aggregation:
        if (self.reduce == "softmax") != (self.temperature is not None):
            raise ValueError("'temperature' is set exactly when reduce is 'softmax'")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_temperature(self, handler: Any) -> dict[str, Any]:
        # Bundles written before softmax pooling existed keep their content hash.
        out: dict[str, Any] = handler(self)
        if out.get("temperature") is None:
            out.pop("temperature", None)
        return out


class Calibration(_Strict):
    """The benign distribution of the request score and the threshold drawn from it."""

    baseline_mean: float
    baseline_std: float = Field(gt=0)
    threshold: float
    fpr: float = Field(gt=0, lt=1)
    n_benign: int = Field(gt=0)
    source: str
    # Deciles of the benign scores, for drift statistics against live traffic.
    quantiles: tuple[float, ...] = ()

    @field_validator("baseline_mean", "baseline_std", "threshold")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


Finite = Annotated[float, Field(allow_inf_nan=False)]


class Head(_Strict):
    """A feature's request score as a linear function (a logistic probe's logit) of the pooled
    token scores of ``inputs`` (feature names, the feature itself allowed)."""

    inputs: tuple[str, ...] = Field(min_length=1)
    weights: tuple[Finite, ...]
    bias: Finite = 0.0

    @model_validator(mode="after")
    def _one_weight_per_input(self) -> Head:
        if len(self.weights) != len(self.inputs):
            raise ValueError(
                f"{len(self.weights)} weights for {len(self.inputs)} inputs; expected one each"
            )
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs repeat a feature: {list(self.inputs)}")
        return self


class FeatureSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    method: Method
    kind: Literal["linear", "jumprelu"] = "linear"
    source: str
    params: dict[str, Any] = Field(default_factory=dict)
    aggregation: Aggregation = Aggregation()
    calibration: Calibration | None = None
    # The decoder layer this feature's direction reads; None: the bundle's layer.
    layer: int | None = Field(default=None, gt=0)
    head: Head | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_parts(self, handler: Any) -> dict[str, Any]:
        # Single-layer bundles without heads keep the content hash they were written with.
        out: dict[str, Any] = handler(self)
        for key in ("layer", "head"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class BundleSpec(_Strict):
    model: ModelRef
    layer: int = Field(gt=0)
    hook: Literal["resid_post"] = "resid_post"  # HOOK_POINT
    features: tuple[FeatureSpec, ...]


@dataclass
class Bundle:
    spec: BundleSpec
    directions: np.ndarray  # [k, d] float32
    bias: np.ndarray  # [k] float32
    jump_threshold: np.ndarray  # [k] float32
    path: Path | None = field(default=None, compare=False)

    @property
    def k(self) -> int:
        return len(self.spec.features)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.spec.features]

    @property
    def layers(self) -> list[int]:
        """The decoder layer each direction (column) reads, in column order."""
        return [f.layer or self.spec.layer for f in self.spec.features]

    @property
    def tapped_layers(self) -> list[int]:
        """The distinct layers the tap projects after, shallowest first."""
        return sorted(set(self.layers))

    def columns_at(self, layer: int) -> np.ndarray:
        """The column indices whose directions read ``layer``."""
        return np.array([i for i, x in enumerate(self.layers) if x == layer], np.int64)

    @property
    def content_hash(self) -> str:
        return content_hash(self.spec, self.directions, self.bias, self.jump_threshold)

    @property
    def bundle_id(self) -> str:
        """Short hash carried by scores, metrics labels and flagged samples."""
        return self.content_hash[:12]

    def feature(self, name: str) -> FeatureSpec:
        for f in self.spec.features:
            if f.name == name:
                return f
        raise BundleError(
            self.path or "<memory>", f"no feature {name!r}; it has {self.feature_names}"
        )

    def with_feature(
        self, feature: FeatureSpec, direction: np.ndarray, bias: float = 0.0, jump: float = 0.0
    ) -> Bundle:
        """A copy with ``feature`` added, or replacing the feature of the same name."""
        names = self.feature_names
        feats = list(self.spec.features)
        rows = list(self.directions)
        biases, jumps = list(self.bias), list(self.jump_threshold)
        vec = np.asarray(direction, dtype=np.float32).reshape(-1)
        if feature.name in names:
            i = names.index(feature.name)
            feats[i], rows[i], biases[i], jumps[i] = feature, vec, bias, jump
        else:
            feats.append(feature)
            rows.append(vec)
            biases.append(bias)
            jumps.append(jump)
        spec = self.spec.model_copy(update={"features": tuple(feats)})
        out = Bundle(
            spec,
            np.stack(rows).astype(np.float32),
            np.asarray(biases, np.float32),
            np.asarray(jumps, np.float32),
        )
        validate(out, "<new>")
        return out

    def with_spec(self, spec: BundleSpec) -> Bundle:
        out = Bundle(spec, self.directions, self.bias, self.jump_threshold)
        validate(out, "<new>")
        return out

    def check_model(self, info: dict[str, object]) -> None:
        """Refuse a model this bundle was not built for (``info`` from ``model_store.model_info``)."""
        m = self.spec.model
        where = self.path or "<memory>"
        if info["hidden_size"] != m.hidden_size:
            raise BundleError(
                where,
                f"built for {m.name} (hidden size {m.hidden_size}) but the model "
                f"{info['name']} has hidden size {info['hidden_size']}",
            )
        if info["num_layers"] != m.num_layers or info["name"] != m.name:
            raise BundleError(
                where,
                f"built for {m.name} ({m.num_layers} layers) but the model is "
                f"{info['name']} ({info['num_layers']} layers)",
            )


def empty(model: ModelRef, layer: int) -> Bundle:
    d = model.hidden_size
    spec = BundleSpec(model=model, layer=layer, features=())
    z = np.zeros((0,), np.float32)
    return Bundle(spec, np.zeros((0, d), np.float32), z, z.copy())


def content_hash(spec: BundleSpec, *arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def validate(b: Bundle, where: object) -> None:
    s = b.spec
    k, d = len(s.features), s.model.hidden_size
    names = [f.name for f in s.features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BundleError(where, f"feature names must be unique, repeated: {dupes}")
    if not 1 <= s.layer <= s.model.num_layers:
        raise BundleError(
            where,
            f"field 'layer' is {s.layer}, expected 1..{s.model.num_layers} for {s.model.name}",
        )
    for i, f in enumerate(s.features):
        if f.layer is not None and not 1 <= f.layer <= s.model.num_layers:
            raise BundleError(
                where,
                f"field 'features.{i}.layer' ({f.name!r}) is {f.layer}, expected "
                f"1..{s.model.num_layers} for {s.model.name}",
            )
        if f.head is None:
            continue
        for j, name in enumerate(f.head.inputs):
            if name not in names:
                raise BundleError(
                    where,
                    f"field 'features.{i}.head.inputs.{j}' ({f.name!r}) is {name!r}, expected "
                    f"one of the bundle's features {names}",
                )
            if name != f.name and s.features[names.index(name)].head is not None:
                # One level only: a head reads pooled token scores, which a head has none of.
                raise BundleError(
                    where,
                    f"field 'features.{i}.head.inputs.{j}' ({f.name!r}) is {name!r}, which has a "
                    "head itself; expected a feature without one",
                )
    expect = {"directions": (k, d), "bias": (k,), "jump_threshold": (k,)}
    for name, shape in expect.items():
        arr = getattr(b, name)
        if arr.shape != shape:
            raise BundleError(
                where,
                f"tensor '{name}' has shape {list(arr.shape)}, expected {list(shape)} "
                f"({k} features, hidden size {d})",
            )
        if arr.dtype != np.float32:
            raise BundleError(where, f"tensor '{name}' is {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise BundleError(where, f"tensor '{name}' holds NaN or infinite values")
    for i, f in enumerate(s.features):
        if not np.any(b.directions[i]):
            raise BundleError(where, f"feature {f.name!r} has an all-zero direction")
        if b.jump_threshold[i] < 0:
            # A JumpReLU threshold is never negative; the sidecar relies on it to undo the bias of
            # activations the tap sends.
            raise BundleError(
                where,
                f"tensor 'jump_threshold' is {b.jump_threshold[i]:g} for feature {f.name!r}, "
                "expected >= 0",
            )


def save(b: Bundle, path: str | Path) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    validate(b, path)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "spec": json.dumps(b.spec.model_dump(mode="json"), sort_keys=True),
        "content_hash": b.content_hash,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {"directions": b.directions, "bias": b.bias, "jump_threshold": b.jump_threshold},
        str(tmp),
        metadata=meta,
    )
    tmp.replace(path)
    b.path = path
    return path


def load(path: str | Path) -> Bundle:
    """Load and check everything the file alone can tell; ``check_model`` checks the rest."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "file not found")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a file that is not its format
        raise BundleError(
            path, f"not a safetensors file ({type(exc).__name__}: {exc}); pickles are never loaded"
        ) from None
    if meta.get("format") != FORMAT:
        raise BundleError(path, f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise BundleError(
            path,
            f"metadata 'format_version' is {meta.get('format_version')!r}; this version of "
            f"misalign-monitor reads format version {FORMAT_VERSION}",
        )
    try:
        spec = BundleSpec.model_validate_json(meta.get("spec", ""))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BundleError(path, f"metadata 'spec' field '{loc}': {first['msg']}") from None
    missing = [t for t in TENSORS if t not in tensors]
    if missing:
        raise BundleError(path, f"missing tensors {missing}; a bundle holds {list(TENSORS)}")
    b = Bundle(spec, tensors["directions"], tensors["bias"], tensors["jump_threshold"], path)
    validate(b, path)
    stored = meta.get("content_hash")
    if stored != b.content_hash:
        raise BundleError(
            path,
            f"content hash mismatch: metadata says {stored!r} but the content hashes to "
            f"{b.content_hash!r}; the file was modified after it was written",
        )
    return b


def default_bundle_path() -> Path:
    return Path(__file__).parent / "bundles" / "smollm2-135m-instruct.safetensors"
