"""The host side of mitigation (tap.mitigation) without vLLM: rules, per-request choices, the
control rows the op reads, the running sums its gate uses, and the prefix-cache salt."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from detectors import bundle as bundle_io
from detectors.errors import TapConfigError
from tap.mitigation import EXTRA_ARG, Mitigation, parse_rules, rules_label, salted
from tap.projection_op import ABLATE, GATED, PREV_SUM, STEER, ctl_width
from tap.settings import ClientChoice, read_settings

B = bundle_io.load(bundle_io.default_bundle_path())
K = B.k
MP, TOX = B.feature_names.index("misaligned_persona"), B.feature_names.index("toxic")
DEFAULT = "misaligned_persona=ablate@always,toxic=steer:2.5@flagged"


def runner(**extra: dict[str, Any] | None) -> Any:
    """What the hook reads of vLLM's model runner: each request's sampling params."""
    return SimpleNamespace(
        requests={
            rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=e))
            for rid, e in extra.items()
        }
    )


def mitigation(default_on: bool = True, clients: ClientChoice = "rules") -> Mitigation:
    return Mitigation(B, parse_rules(DEFAULT, B, "MISALIGN_TAP_MITIGATION"), default_on, clients)


def test_rules_parse_into_feature_mode_strength_and_when() -> None:
    rules = parse_rules(f" {DEFAULT} ,", B, "env")
    assert [(r.feature, r.mode, r.alpha, r.when) for r in rules] == [
        (MP, "ablate", 0.0, "always"),
        (TOX, "steer", 2.5, "flagged"),
    ]
    assert rules_label(rules) == "ablate:misaligned_persona@always,steer:2.5:toxic@flagged"
    assert parse_rules("", B, "env") == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("misaligned_persona=ablate", "'misaligned_persona=ablate' is not FEATURE=ablate@WHEN"),
        ("misaligned_persona=mute@always", "is not FEATURE=ablate@WHEN"),
        ("nosuch=ablate@always", "feature 'nosuch' is not in bundle"),
        ("toxic=steer@always", "'toxic=steer@always': steer needs :ALPHA"),
        ("toxic=steer:1..2@always", "'toxic=steer:1..2@always': ALPHA is not a number"),
        ("toxic=ablate@always,toxic=steer:2@flagged", "feature 'toxic' has two rules"),
    ],
)
def test_a_bad_rule_is_refused_naming_where_it_came_from(text: str, says: str) -> None:
    with pytest.raises(TapConfigError) as err:
        parse_rules(text, B, "MISALIGN_TAP_MITIGATION")
    assert "MISALIGN_TAP_MITIGATION" in str(err.value) and says in str(err.value)


def test_flagged_needs_a_calibrated_threshold() -> None:
    spec = B.spec.features[TOX].model_copy(update={"calibration": None})
    b = B.with_feature(spec, B.directions[TOX], float(B.bias[TOX]), 0.0)
    with pytest.raises(TapConfigError, match="'toxic' has no calibration"):
        parse_rules("toxic=steer:2@flagged", b, "env")


def test_flagged_needs_a_feature_scored_as_the_response_mean() -> None:
    """The op's gate is the running response mean: a threshold calibrated for another request
    score would open it at the wrong time, so such a rule is refused; @always still works."""
    spec = B.spec.features[TOX]
    rolling = spec.model_copy(
        update={"aggregation": spec.aggregation.model_copy(update={"reduce": "max_rolling_mean"})}
    )
    b = B.with_feature(rolling, B.directions[TOX], float(B.bias[TOX]), 0.0)
    with pytest.raises(TapConfigError, match="scores 'toxic' as response max_rolling_mean"):
        parse_rules("toxic=steer:2@flagged", b, "env")
    assert parse_rules("toxic=steer:2@always", b, "env")[0].when == "always"


def test_flagged_is_refused_for_a_feature_scored_by_a_head() -> None:
    from detectors.bundle import Head

    head = Head(inputs=("toxic", "misaligned_persona"), weights=(1.0, 0.5))
    spec = B.spec.features[TOX].model_copy(update={"head": head})
    b = B.with_feature(spec, B.directions[TOX], float(B.bias[TOX]), 0.0)
    with pytest.raises(TapConfigError, match="scores 'toxic' by a head; use @always"):
        parse_rules("toxic=steer:2@flagged", b, "env")
    assert parse_rules("toxic=steer:2@always", b, "env")[0].when == "always"


@pytest.mark.parametrize(
    ("default_on", "asked", "label"),
    [
        (True, None, "ablate:misaligned_persona@always,steer:2.5:toxic@flagged"),
        (False, None, ""),
        (True, "off", ""),
        (False, "on", "ablate:misaligned_persona@always,steer:2.5:toxic@flagged"),
        (False, "toxic=steer:8@always", "steer:8:toxic@always"),
        # Malformed: the default (a bad value is no way out of mitigation), the step goes on.
        (
            True,
            "toxic=steer:eight@always",
            "ablate:misaligned_persona@always,steer:2.5:toxic@flagged",
        ),
        (False, "nosuch=ablate@always", ""),
    ],
)
def test_each_request_gets_the_default_its_choice_or_nothing(
    default_on: bool, asked: str | None, label: str
) -> None:
    m = mitigation(default_on)
    extra = {} if asked is None else {EXTRA_ARG: asked}
    assert rules_label(m.rules_for("r", extra)) == label
    m.controls(runner(r=extra), ["r"], np.array([0, 1]), np.array([0]), np.array([0], np.int8))
    assert m.labels(["r"]) == [label]


def sums(m: Mitigation, rid: str, pos: int) -> tuple[np.ndarray, float]:
    """What the op's gate starts from for a row of ``rid`` at ``pos``: (prev sum, count)."""
    ctl = m.controls(runner(**{rid: None}), [rid], np.array([0, 1]), np.array([pos]), np.ones(1))
    return ctl[0, PREV_SUM * K : (PREV_SUM + 1) * K], float(ctl[0, -1])


def test_control_rows_gate_the_prompt_and_carry_the_running_sums() -> None:
    m = mitigation()
    run = runner(a=None, b={EXTRA_ARG: "off"})
    offsets = np.array([0, 3, 5])
    positions = np.array([0, 1, 2, 0, 1])
    roles = np.array([0, 0, 1, 0, 1], np.int8)
    ctl = m.controls(run, ["a", "b"], offsets, positions, roles)
    assert ctl.shape == (5, ctl_width(K))
    np.testing.assert_array_equal(ctl[:3, ABLATE * K + MP], 1.0)  # @always: prompt rows too
    # @flagged: never on the prompt; on the answer once the gate (on the device) opens.
    np.testing.assert_array_equal(ctl[:3, STEER * K + TOX], [0.0, 0.0, 2.5])
    np.testing.assert_array_equal(ctl[:3, GATED * K + TOX], 1.0)
    assert not ctl[3:].any()  # opted out
    assert m.any_gated(["a", "b"]) and not m.any_gated(["b"])

    # After the step: response rows go into the sums the next step's gate starts from.
    act = np.arange(5 * K, dtype=np.float32).reshape(5, K)
    m.observe(["a", "b"], offsets, positions, roles, act)
    total, n = sums(m, "a", 3)
    np.testing.assert_allclose(total, act[2])
    assert n == 1


def test_rows_that_come_again_replace_the_earlier_ones_in_the_sums() -> None:
    """Preemption recomputes a request's rows; speculative decoding runs drafts ahead that may be
    rejected and their positions filled by other tokens. The gate of a row at position q counts
    the latest row kept at each position below q."""
    m = mitigation()
    one = np.array([0, 1])
    for pos, value in enumerate([1.0, 2.0, 4.0]):  # prompt 0, answer rows 1 and 2
        m.controls(runner(a=None), ["a"], one, np.array([pos]), np.array([min(pos, 1)]))
        row = np.full((1, K), value, np.float32)
        m.observe(["a"], one, np.array([pos]), np.array([min(pos, 1)], np.int8), row)
    total, n = sums(m, "a", 3)
    np.testing.assert_allclose(total, 6.0)
    assert n == 2

    # Preempted: prompt and answer recomputed in one chunk, the answer rows slightly different.
    chunk = np.array([[1.0] * K, [2.5] * K, [4.5] * K], np.float32)
    m.controls(runner(a=None), ["a"], np.array([0, 3]), np.arange(3), np.array([0, 1, 1]))
    # The chunk's first row is at 0: its gate starts from nothing kept below it.
    m.observe(["a"], np.array([0, 3]), np.arange(3), np.array([0, 1, 1], np.int8), chunk)
    total, n = sums(m, "a", 3)
    np.testing.assert_allclose(total, 7.0)  # 2.5 + 4.5, not 6 + 7
    assert n == 2

    # Drafts at 3, 4, 5 run; only 3 is accepted, so the next step's row is at 4.
    drafts = np.array([[1.0] * K, [100.0] * K, [100.0] * K], np.float32)
    m.observe(["a"], np.array([0, 3]), np.arange(3, 6), np.ones(3, np.int8), drafts)
    total, n = sums(m, "a", 4)
    np.testing.assert_allclose(total, 8.0)  # the rejected drafts at 4 and 5 are not below 4
    assert n == 3
    m.observe(["a"], one, np.array([4]), np.ones(1, np.int8), np.full((1, K), 3.0, np.float32))
    total, n = sums(m, "a", 5)
    np.testing.assert_allclose(total, 11.0)
    assert n == 4

    m.forget({"a"})
    assert m.labels(["a"]) == [""]


def test_requests_without_a_gated_rule_keep_no_rows() -> None:
    m = Mitigation(B, parse_rules("misaligned_persona=ablate@always", B, "env"), True)
    m.controls(runner(a=None), ["a"], np.array([0, 1]), np.array([5]), np.ones(1))
    assert not m.any_gated(["a"])

    class Never:
        def synchronize(self) -> None:
            raise AssertionError("waited for a device copy nobody needs")

    m.observe(["a"], np.array([0, 1]), np.array([5]), np.ones(1, np.int8), np.ones((1, K)), Never())
    total, n = sums(m, "a", 6)
    assert n == 0 and not total.any()


def test_requests_mitigated_differently_never_share_a_prefix_cache_salt() -> None:
    m = mitigation(default_on=False)
    assert salted(m, "r", {}, None) is None  # unmitigated: vLLM's cache as it would be
    assert salted(m, "r", {}, "tenant-7") == "tenant-7"
    on = salted(m, "r", {EXTRA_ARG: "on"}, None)
    salts = {
        on,
        salted(m, "r", {EXTRA_ARG: "on"}, "tenant-7"),
        salted(m, "r", {EXTRA_ARG: "toxic=steer:12.34567@always"}, None),
        salted(m, "r", {EXTRA_ARG: "toxic=steer:12.34568@always"}, None),  # same label, :g
        salted(m, "r", {EXTRA_ARG: "toxic=ablate@always"}, None),
    }
    assert len(salts) == 5 and None not in salts
    # The same rules in another order are the same cache; a salt is what vLLM accepts from a
    # client: at most 128 characters, no '@', '/', '\\' or NUL.
    swapped = "toxic=steer:2.5@flagged,misaligned_persona=ablate@always"
    assert salted(m, "q", {EXTRA_ARG: swapped}, None) == on
    for salt in salts:
        assert salt is not None and len(salt) <= 128 and not set(salt) & set("@/\\\0")


def test_the_op_ablates_steers_and_gates_strictly_above_the_threshold() -> None:
    """``misalign::project_mitigate`` on its own (CPU): ablation leaves the projection at zero,
    steering moves it by -alpha times the norm, the gate opens only when the running mean is
    above the threshold (as the sidecar flags: score > threshold), other rows are untouched."""
    import torch

    from tap import projection_op

    projection_op.register()
    torch.manual_seed(0)
    k, d = 2, 8
    h, r = torch.randn(5, d), torch.randn(5, d)
    w = torch.randn(d, k)
    norms = w.norm(dim=0)
    bias, jump = torch.zeros(k), torch.full((k,), -float("inf"))
    out, applied = torch.zeros(8, k), torch.zeros(8)
    x = h + r
    raw = x @ w
    threshold = torch.tensor([float("inf"), 1.0])
    ctl = torch.zeros(8, ctl_width(k))
    ctl[0, ABLATE * k + 0] = 1.0  # row 0: ablate feature 0, always
    ctl[1, STEER * k + 1] = 3.0  # row 1: steer feature 1 by 3, always
    for row in (2, 3):  # rows 2 and 3: steer feature 1 once flagged
        ctl[row, STEER * k + 1] = 3.0
        ctl[row, GATED * k + 1] = 1.0
        ctl[row, -1] = 1.0  # one response row before this one
    # Running means (prev + this) / 2: exactly the threshold for row 2, above it for row 3.
    ctl[2, PREV_SUM * k + 1] = 2.0 - float(raw[2, 1])
    ctl[3, PREV_SUM * k + 1] = 2.5 - float(raw[3, 1])
    torch.ops.misalign.project_mitigate(
        h, r, w, bias, jump, out, (w / norms).T.contiguous(), 1.0 / norms, threshold, ctl, applied
    )
    after = (h + r) @ w
    np.testing.assert_allclose(out[:5].numpy(), raw.numpy(), rtol=1e-5)  # read before the edit
    assert abs(float(after[0, 0])) < 1e-4 * float(raw[0].abs().max())
    shift = 3.0 * float(norms[1])
    np.testing.assert_allclose(float(after[1, 1]), float(raw[1, 1]) - shift, rtol=1e-4)
    np.testing.assert_allclose(after[2].numpy(), raw[2].numpy(), rtol=1e-5)  # at, not above
    np.testing.assert_allclose(float(after[3, 1]), float(raw[3, 1]) - shift, rtol=1e-4)
    np.testing.assert_allclose(after[4].numpy(), raw[4].numpy(), rtol=1e-5)
    assert applied.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("clients", "asked", "label"),
    [
        ("on", "on", "ablate:misaligned_persona@always,steer:2.5:toxic@flagged"),
        ("on", "off", ""),  # the default is off here, and "off" is refused: still off
        ("on", "toxic=steer:8@always", ""),
        ("rules", "toxic=steer:8@always", "steer:8:toxic@always"),
        ("rules", "off", ""),
        ("switch", "off", ""),
        ("switch", "on", "ablate:misaligned_persona@always,steer:2.5:toxic@flagged"),
        # Asking for its own rules where only on/off is allowed: the default, not the ask.
        ("switch", "toxic=steer:8@always", ""),
        ("none", "off", "ablate:misaligned_persona@always,steer:2.5:toxic@flagged"),
        (
            "none",
            "toxic=steer:8@always",
            "ablate:misaligned_persona@always,steer:2.5:toxic@flagged",
        ),
    ],
)
def test_the_operator_limits_what_a_request_may_choose(
    clients: str, asked: str, label: str
) -> None:
    on = clients == "none"  # with "none", the operator's rules for everyone
    m = Mitigation(B, parse_rules(DEFAULT, B, "env"), on, clients)
    assert rules_label(m.rules_for("r", {EXTRA_ARG: asked})) == label


def test_settings_that_mitigate_nobody_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION", "toxic=ablate@always")
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION_DEFAULT", "off")
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION_CLIENTS", "none")
    with pytest.raises(TapConfigError, match="mitigates no request"):
        read_settings()
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION_CLIENTS", "everyone")
    with pytest.raises(TapConfigError, match="MISALIGN_TAP_MITIGATION_CLIENTS: Input should be"):
        read_settings()
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION_CLIENTS", "switch")
    assert read_settings().mitigation_clients == "switch"


def test_by_default_a_request_may_only_switch_mitigation_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whoever calls the API sends extra_args: unless the operator allows more, a request can
    turn mitigation on but neither off nor into rules of its own; each refusal is counted and
    the request keeps the operator's rules."""
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION", DEFAULT)
    settings = read_settings()
    assert settings.mitigation_clients == "on"
    m = Mitigation.from_settings(settings, B)
    default = rules_label(m.default_rules)
    for asked in ("off", "OFF ", "toxic=steer:8@always", "toxic=steer:-8@always"):
        assert rules_label(m.rules_for("r", {EXTRA_ARG: asked})) == default
    assert m.refused == {"off": 1, "rules": 3}
    # The salt is decided in another process from the same choice, without counting it again.
    assert salted(m, "r", {EXTRA_ARG: "off"}, None) == salted(m, "r", {}, None)
    assert m.refused == {"off": 1, "rules": 3}

    monkeypatch.setenv("MISALIGN_TAP_MITIGATION_DEFAULT", "off")
    m = Mitigation.from_settings(read_settings(), B)
    assert rules_label(m.rules_for("r", {EXTRA_ARG: "on"})) == default
    assert m.rules_for("r", {}) == () and not m.refused


@pytest.mark.parametrize("alpha", ["-8", "0", "0.0", "1e-400", "1e999", "16.5"])
def test_steer_strength_must_be_finite_positive_and_at_most_the_max(
    alpha: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """steer moves the residual by -alpha along the unit direction: alpha <= 0 steers toward the
    feature (or not at all), 1e999 parses as infinity. Refused in the operator's rules at start,
    and in a request's (it keeps the default, counted)."""
    rule = f"toxic=steer:{alpha}@always"
    with pytest.raises(
        TapConfigError, match="ALPHA must be a finite number above 0 and at most 16"
    ):
        parse_rules(rule, B, "MISALIGN_TAP_MITIGATION")
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION", rule)
    with pytest.raises(TapConfigError, match=r"MISALIGN_TAP_MITIGATION: .*ALPHA must be"):
        Mitigation.from_settings(read_settings(), B)

    m = mitigation(clients="rules")
    assert rules_label(m.rules_for("r", {EXTRA_ARG: rule})) == rules_label(m.default_rules)
    assert m.refused == {"malformed": 1}
    # Within the bound, and ablation (no strength), a request's own rules are taken.
    assert rules_label(m.rules_for("r", {EXTRA_ARG: "toxic=steer:16@always"})) == (
        "steer:16:toxic@always"
    )
    assert rules_label(m.rules_for("r", {EXTRA_ARG: "toxic=ablate@always"})) == (
        "ablate:toxic@always"
    )


def test_the_operator_sets_the_strongest_steer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION", "toxic=steer:40@always")
    monkeypatch.setenv("MISALIGN_TAP_MITIGATION_MAX_ALPHA", "50")
    m = Mitigation.from_settings(read_settings(), B)
    assert rules_label(m.default_rules) == "steer:40:toxic@always"
    assert m.rules_for("r", {EXTRA_ARG: "toxic=steer:51@always"}, count=False) == m.default_rules
    for bad in ("0", "-1", "inf", "nan", "many"):
        monkeypatch.setenv("MISALIGN_TAP_MITIGATION_MAX_ALPHA", bad)
        with pytest.raises(
            TapConfigError, match=r"^misalign tap: MISALIGN_TAP_MITIGATION_MAX_ALPHA"
        ):
            read_settings()
