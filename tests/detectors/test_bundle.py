"""The bundle round trip and every way a bundle file can be wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from detectors import bundle as bundle_io
from detectors.bundle import Aggregation, Bundle, FeatureSpec
from detectors.errors import BundleError
from tests.support.tiny_models import MODEL, make_bundle


def rewrite(path: Path, tensors: dict[str, np.ndarray] | None = None, **meta: str) -> None:
    """Write the file again with changed tensors or metadata, as a tamperer would."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        old_meta = dict(fh.metadata())
    t = load_file(str(path))
    t.update(tensors or {})
    old_meta.update(meta)
    save_file(t, str(path), metadata=old_meta)


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    b = make_bundle()
    path = bundle_io.save(b, tmp_path / "b.safetensors")
    loaded = bundle_io.load(path)
    assert loaded.spec == b.spec
    np.testing.assert_array_equal(loaded.directions, b.directions)
    np.testing.assert_array_equal(loaded.bias, b.bias)
    assert loaded.content_hash == b.content_hash
    assert len(loaded.bundle_id) == 12


def test_hash_covers_tensors_and_metadata() -> None:
    b = make_bundle()
    moved = Bundle(b.spec, b.directions + np.float32(1e-3), b.bias, b.jump_threshold)
    renamed = b.with_spec(b.spec.model_copy(update={"layer": 3}))
    assert len({b.content_hash, moved.content_hash, renamed.content_hash}) == 3


def test_replacing_a_feature_keeps_the_others(tmp_path: Path) -> None:
    b = make_bundle()
    new = FeatureSpec(name="f0", method="diff-means", source="y.jsonl")
    b2 = b.with_feature(new, np.ones(8))
    assert b2.feature_names == ["f0", "f1"]
    assert b2.feature("f0").method == "diff-means"
    np.testing.assert_array_equal(b2.directions[1], b.directions[1])


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda p: rewrite(p, {"directions": np.zeros((2, 7), np.float32)}),
            "shape [2, 7], expected [2, 8]",
        ),
        (lambda p: rewrite(p, {"bias": np.array([np.nan, 0], np.float32)}), "'bias' holds NaN"),
        (lambda p: rewrite(p, format_version="99"), "format_version' is '99'"),
        (lambda p: rewrite(p, format="something-else"), "metadata 'format'"),
        (lambda p: rewrite(p, content_hash="0" * 64), "content hash mismatch"),
        (
            lambda p: rewrite(p, {"directions": np.ones((2, 8), np.float32)}),
            "content hash mismatch",
        ),
        (lambda p: rewrite(p, spec="{not json"), "metadata 'spec'"),
        (lambda p: p.write_bytes(pickle.dumps({"directions": [1, 2]})), "not a safetensors file"),
        (lambda p: p.unlink(), "file not found"),
    ],
    ids=[
        "wrong-shape",
        "nan",
        "unknown-version",
        "wrong-format",
        "tampered-hash",
        "tampered-tensor",
        "broken-spec",
        "pickle",
        "missing",
    ],
)
def test_bad_bundles_are_refused_with_the_reason(tmp_path: Path, tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    path = bundle_io.save(make_bundle(), tmp_path / "b.safetensors")
    tamper(path)
    with pytest.raises(BundleError) as err:
        bundle_io.load(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_layer_out_of_range_is_refused(tmp_path: Path) -> None:
    path = bundle_io.save(make_bundle(), tmp_path / "b.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        spec = json.loads(fh.metadata()["spec"])
    spec["layer"] = 9
    b = make_bundle()
    bad = bundle_io.BundleSpec.model_validate(spec)
    with pytest.raises(BundleError, match=r"field 'layer' is 9, expected 1..4"):
        Bundle(bad, b.directions, b.bias, b.jump_threshold).with_spec(bad)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = bundle_io.save(make_bundle(), tmp_path / "b.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = dict(fh.metadata())
    t = load_file(str(path))
    del t["jump_threshold"]
    save_file(t, str(path), metadata=meta)
    with pytest.raises(BundleError, match=r"missing tensors \['jump_threshold'\]"):
        bundle_io.load(path)


def test_bundle_for_another_model_is_refused() -> None:
    b = make_bundle()
    with pytest.raises(BundleError, match=r"hidden size 8\).* hidden size 576"):
        b.check_model({"name": "SmolLM2", "hidden_size": 576, "num_layers": 30})
    with pytest.raises(BundleError, match="built for tiny"):
        b.check_model({"name": "other", "hidden_size": 8, "num_layers": 6})
    b.check_model({"name": "tiny", "hidden_size": 8, "num_layers": 4})


def test_all_zero_direction_and_duplicate_names_are_refused() -> None:
    b = make_bundle(k=1)
    with pytest.raises(BundleError, match="all-zero direction"):
        b.with_feature(FeatureSpec(name="z", method="probe", source="s"), np.zeros(8))
    dup = b.spec.model_copy(update={"features": b.spec.features * 2})
    with pytest.raises(BundleError, match="unique"):
        Bundle(
            dup, np.ones((2, 8), np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32)
        ).with_spec(dup)


def test_shipped_bundle_loads_and_is_calibrated() -> None:
    b = bundle_io.load(bundle_io.default_bundle_path())
    assert {"misaligned_persona", "toxic", "persona_contrast"} <= set(b.feature_names)
    assert b.spec.model.name == "SmolLM2-135M-Instruct" and b.spec.model.hidden_size == 576
    for f in b.spec.features:
        assert f.calibration is not None and f.calibration.fpr == 0.01
        assert f.calibration.n_benign >= 100


def test_softmax_aggregation_round_trips_and_needs_its_temperature(tmp_path: Path) -> None:
    b = make_bundle()
    f0 = b.spec.features[0].model_copy(
        update={"aggregation": Aggregation(reduce="softmax", temperature=2.5)}
    )
    b = b.with_spec(b.spec.model_copy(update={"features": (f0, b.spec.features[1])}))
    path = bundle_io.save(b, tmp_path / "b.safetensors")
    loaded = bundle_io.load(path)
    assert loaded.feature("f0").aggregation.temperature == 2.5
    assert loaded.content_hash == b.content_hash
    # a rolling-mean feature carries no temperature, so older bundles keep their hash
    assert "temperature" not in json.dumps(loaded.feature("f1").aggregation.model_dump())
    for bad, msg in (
        ({"reduce": "softmax"}, "'temperature' is set exactly when reduce is 'softmax'"),
        ({"reduce": "softmax", "temperature": 0}, "greater than 0"),
        ({"reduce": "mean", "temperature": 1.0}, "'temperature' is set exactly"),
    ):
        spec = json.loads(json.dumps(loaded.spec.model_dump(mode="json")))
        spec["features"][0]["aggregation"] = bad
        rewrite(path, spec=json.dumps(spec))
        with pytest.raises(BundleError, match=r"features\.0\.aggregation") as err:
            bundle_io.load(path)
        assert msg in str(err.value)


def _multi(tmp_path: Path) -> tuple[Bundle, Path]:
    from tests.support.tiny_models import multi_layer_bundle

    path = tmp_path / "multi.safetensors"
    return multi_layer_bundle(path, MODEL, (2, 4)), path


def test_multi_layer_and_head_bundle_round_trips(tmp_path: Path) -> None:
    b, path = _multi(tmp_path)
    loaded = bundle_io.load(path)
    assert loaded.spec == b.spec and loaded.content_hash == b.content_hash
    assert loaded.layers == [2, 4, 4, 2] and loaded.tapped_layers == [2, 4]
    assert loaded.columns_at(4).tolist() == [1, 2]
    head = loaded.feature("combined").head
    assert head is not None and head.inputs == ("combined", "f1", "sae_latent")
    assert head.weights == (0.7, -1.2, 0.5) and head.bias == 0.1


def test_single_layer_bundles_keep_their_hash_and_the_hash_covers_layers_and_heads(
    tmp_path: Path,
) -> None:
    # A bundle without either part writes no 'layer' or 'head' key, so its hash is the one it was
    # written with before multi-layer bundles existed (the shipped bundle loads: its stored hash).
    spec = make_bundle().spec.model_dump(mode="json")
    assert all("layer" not in f and "head" not in f for f in spec["features"])
    bundle_io.load(bundle_io.default_bundle_path())
    b, _ = _multi(tmp_path)
    feats = list(b.spec.features)
    moved = feats[1].model_copy(update={"layer": 3})
    head = feats[3].head
    assert head is not None
    reweighted = feats[3].model_copy(
        update={"head": head.model_copy(update={"weights": (0.7, -1.2, 0.6)})}
    )
    hashes = {b.content_hash}
    for i, f in ((1, moved), (3, reweighted)):
        changed = list(feats)
        changed[i] = f
        hashes.add(b.with_spec(b.spec.model_copy(update={"features": tuple(changed)})).content_hash)
    assert len(hashes) == 3


def _edit_spec(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        spec = json.loads(fh.metadata()["spec"])
    edit(spec)
    rewrite(path, spec=json.dumps(spec))


def _set(spec: dict, feature: int, key: str, value: object) -> None:  # type: ignore[type-arg]
    *parents, last = key.split(".")
    d = spec["features"][feature]
    for p in parents:
        d = d[p]
    d[last] = value


@pytest.mark.parametrize(
    ("feature", "key", "value", "message"),
    [
        (1, "layer", 9, "field 'features.1.layer' ('f1') is 9, expected 1..4"),
        (1, "layer", 0, "field 'features.1.layer'"),
        (1, "layer", "deep", "field 'features.1.layer'"),
        (3, "head.weights", [0.7, float("nan"), 0.5], "field 'features.3.head.weights.1'"),
        (3, "head.weights", [0.7, float("inf"), 0.5], "field 'features.3.head.weights.1'"),
        (3, "head.bias", float("-inf"), "field 'features.3.head.bias'"),
        (3, "head.weights", [0.7, -1.2], "field 'features.3.head': Value error, 2 weights"),
        (3, "head.inputs", ["combined", "nope", "f0"], "field 'features.3.head.inputs.1'"),
        (3, "head.inputs", [], "field 'features.3.head.inputs'"),
        (0, "head", {"inputs": ["combined"], "weights": [1.0]}, "which has a head itself"),
    ],
    ids=[
        "layer-too-deep",
        "layer-zero",
        "layer-not-int",
        "nan-weight",
        "inf-weight",
        "inf-bias",
        "weights-vs-inputs",
        "unknown-input",
        "no-inputs",
        "nested-head",
    ],
)
def test_bad_layer_lists_and_heads_are_refused_naming_the_field(
    tmp_path: Path, feature: int, key: str, value: object, message: str
) -> None:
    _, path = _multi(tmp_path)
    _edit_spec(path, lambda s: _set(s, feature, key, value))
    with pytest.raises(BundleError) as err:
        bundle_io.load(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_the_cli_exits_2_naming_the_bad_head_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    _, path = _multi(tmp_path)
    _edit_spec(path, lambda s: _set(s, 3, "head.weights", [0.7, float("nan"), 0.5]))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "misalign_monitor.cli",
            "score",
            "--bundle",
            str(path),
            "--data",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert "features.3.head.weights.1" in p.stderr and "Traceback" not in p.stderr
