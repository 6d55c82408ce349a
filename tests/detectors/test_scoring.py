from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detectors.bundle import Aggregation, Calibration, FeatureSpec
from detectors.calibrate import apply_calibration, calibration_from_scores
from detectors.evaluate import auroc, bootstrap_auroc_ci, detection, tpr_at_fpr
from detectors.scoring import pool_segments, rolling_max_mean, score_request, token_scores
from tests.support.tiny_models import make_bundle


def test_rolling_max_mean_finds_a_local_spike_the_mean_hides() -> None:
    x = np.zeros(40)
    x[20:24] = 4.0
    assert rolling_max_mean(x, 4) == pytest.approx(4.0)
    assert x.mean() == pytest.approx(0.4)
    assert rolling_max_mean(np.array([1.0, 3.0]), 8) == pytest.approx(2.0)  # shorter: the mean


def test_score_request_uses_each_features_span_and_reduce() -> None:
    b = make_bundle(k=2)
    f0 = b.spec.features[0].model_copy(
        update={"aggregation": Aggregation(span="prompt", reduce="mean")}
    )
    b = b.with_spec(b.spec.model_copy(update={"features": (f0, b.spec.features[1])}))
    roles = np.array([0, 0, 1, 1, 1, 1, 1])
    ts = np.array([[1, 0], [3, 0], [0, 0], [0, 9], [0, 9], [0, 9], [0, 9]], np.float32)
    s0, s1 = score_request(b, ts, roles)
    assert s0.score == pytest.approx(2.0) and s0.prompt_mean == pytest.approx(2.0)
    assert s1.score == pytest.approx(9.0)  # max of the 4-token rolling mean over the response
    assert s1.response_mean == pytest.approx(36 / 5)
    assert s1.flagged and not s0.flagged  # thresholds are 2.5
    assert s1.z == pytest.approx((9.0 - 0.1) / 1.0)


def test_jumprelu_zeroes_scores_below_threshold() -> None:
    b = make_bundle(k=1)
    spec = FeatureSpec(name="sae", method="sae", kind="jumprelu", source="s")
    b = b.with_feature(spec, np.ones(8), bias=0.0, jump=1.0)
    ts = token_scores(b, np.array([[0.5, 0.5], [2.0, 2.0], [-3.0, 1.5]], np.float32))
    np.testing.assert_allclose(ts[:, 1], [0.0, 2.0, 1.5])
    np.testing.assert_allclose(ts[:, 0], [0.5, 2.0, -3.0] + b.bias[0])


def test_auroc_matches_sklearn_including_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    lo, hi = bootstrap_auroc_ci(s, y, n_boot=300)
    assert lo < auroc(s, y) < hi


def test_tpr_at_fpr_and_calibration_threshold_hold_the_false_positive_rate() -> None:
    rng = np.random.default_rng(1)
    neg = rng.normal(size=2000)
    pos = rng.normal(loc=3.0, size=500)
    cal = calibration_from_scores(neg, 0.01, "synthetic")
    assert (neg > cal.threshold).mean() <= 0.01
    assert (neg > cal.threshold).mean() > 0.005
    tpr = tpr_at_fpr(np.r_[pos, neg], np.r_[np.ones(500), np.zeros(2000)], 0.01)
    assert tpr == pytest.approx((pos > cal.threshold).mean())
    d = detection(np.r_[pos, neg], np.r_[np.ones(500), np.zeros(2000)], n_boot=100)
    assert d.n_pos == 500 and d.n_neg == 2000 and d.auroc > 0.95


def test_apply_calibration_replaces_only_named_features() -> None:
    b = make_bundle(k=2)
    out = apply_calibration(b, {"f1": np.arange(100.0)}, 0.05, "new.jsonl")
    assert out.feature("f0").calibration == b.feature("f0").calibration
    cal = out.feature("f1").calibration
    assert isinstance(cal, Calibration) and cal.source == "new.jsonl" and cal.n_benign == 100
    assert cal.threshold == pytest.approx(95.0)
    assert out.content_hash != b.content_hash


def test_layer_sweep_is_grouped_so_memorising_a_question_does_not_help() -> None:
    """Labels constant within each question: only a grouped split shows there is no signal."""
    from sklearn.model_selection import KFold

    from detectors.methods import fit_direction, layer_auroc

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 30)
    centres = rng.normal(scale=3.0, size=(12, 20))
    x = centres[groups] + rng.normal(size=(360, 20))
    y = (np.arange(12) % 2 == 0)[groups]
    grouped = layer_auroc({1: x}, y, groups, fit="probe")[1]
    leaky = np.empty(360)
    for tr, te in KFold(5, shuffle=True, random_state=0).split(x):
        d = fit_direction("probe", x[tr][y[tr]], x[tr][~y[tr]])
        leaky[te] = x[te] @ d.vector
    assert auroc(leaky, y) > 0.95
    assert grouped < 0.8


def test_softmax_pooling_matches_its_definition_per_segment() -> None:
    """Each segment pooled on its own (an empty one is NaN); large T gives the mean, small the max."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(23, 2)) * 3
    offsets = np.array([0, 5, 5, 17, 23])
    got = pool_segments(x, offsets, "softmax", temperature=2.0)
    for i in range(4):
        seg = x[offsets[i] : offsets[i + 1]]
        if len(seg) == 0:
            assert np.isnan(got[i]).all()
            continue
        w = np.exp(seg / 2.0)
        np.testing.assert_allclose(got[i], (w * seg).sum(0) / w.sum(0), rtol=1e-12)
    seg = x[5:17]
    np.testing.assert_allclose(
        pool_segments(seg, [0, 12], "softmax", temperature=1e6)[0], seg.mean(0), rtol=1e-4
    )
    np.testing.assert_allclose(
        pool_segments(seg, [0, 12], "softmax", temperature=1e-3)[0], seg.max(0), rtol=1e-6
    )
    # large scores do not overflow: the exp is taken relative to each segment's max
    assert np.isfinite(pool_segments(x * 1e4, offsets, "softmax", temperature=0.1)[[0, 2, 3]]).all()


def test_score_request_pools_with_the_features_softmax_temperature() -> None:
    b = make_bundle(k=2)
    f0 = b.spec.features[0].model_copy(
        update={"aggregation": Aggregation(reduce="softmax", temperature=0.5)}
    )
    f1 = b.spec.features[1].model_copy(
        update={"aggregation": Aggregation(reduce="softmax", temperature=4.0)}
    )
    b = b.with_spec(b.spec.model_copy(update={"features": (f0, f1)}))
    roles = np.array([0, 1, 1, 1])
    ts = np.array([[9, 9], [0, 0], [1, 1], [3, 3]], np.float32)
    s0, s1 = score_request(b, ts, roles)
    resp = np.array([0.0, 1.0, 3.0])
    for s, t in ((s0, 0.5), (s1, 4.0)):
        w = np.exp(resp / t)
        assert s.score == pytest.approx(float((w * resp).sum() / w.sum()))
        assert s.response_mean == pytest.approx(4 / 3)
    assert s0.score > s1.score  # the colder softmax leans further towards the max


def test_a_multi_layer_bundle_projects_each_column_at_its_layer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from detectors.scoring import project
    from tests.support.tiny_models import MODEL, multi_layer_bundle

    b = multi_layer_bundle(tmp_path / "m.safetensors", MODEL, (2, 4))
    rng = np.random.default_rng(0)
    acts = {2: rng.normal(size=(5, 8)), 4: rng.normal(size=(5, 8)), 3: rng.normal(size=(5, 8))}
    got = project(b, acts)
    for col, layer in enumerate(b.layers):
        np.testing.assert_allclose(got[:, col], acts[layer] @ b.directions[col], rtol=1e-5)
    with pytest.raises(ValueError, match=r"reads layers \[2, 4\]"):
        project(b, acts[2])
    with pytest.raises(ValueError, match=r"no activations for layers \[4\]"):
        project(b, {2: acts[2]})


def test_a_head_scores_its_inputs_pooled_by_the_features_aggregation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.tiny_models import MODEL, multi_layer_bundle

    b = multi_layer_bundle(tmp_path / "m.safetensors", MODEL, (2, 4))
    combined = b.spec.features[3].model_copy(
        update={"aggregation": Aggregation(reduce="softmax", temperature=0.5)}
    )
    b = b.with_spec(b.spec.model_copy(update={"features": (*b.spec.features[:3], combined)}))
    rng = np.random.default_rng(1)
    ts = rng.normal(size=(30, 4)).astype(np.float32)
    roles = (np.arange(30) >= 6).astype(np.int8)
    got = score_request(b, ts, roles)
    pooled = pool_segments(ts[roles == 1], np.array([0, 24]), "softmax", temperature=0.5)[0]
    want = 0.1 + 0.7 * pooled[3] - 1.2 * pooled[1] + 0.5 * pooled[2]
    assert got[3].score == pytest.approx(want, rel=1e-9)
    assert got[3].flagged == (want > 0.5) and got[3].z == pytest.approx(want)
    # the head's inputs keep their own scores (response mean by default)
    assert got[1].score == pytest.approx(ts[roles == 1, 1].mean(dtype=np.float64), rel=1e-6)
    # a request without a response: no pooled value, no head score, no flag
    none = score_request(b, ts[:6], roles[:6])
    assert np.isnan(none[3].score) and not none[3].flagged
