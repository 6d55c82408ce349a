"""Mitigation: which rows of a step the op moves away from which features, and by how much.

Off unless ``MISALIGN_TAP_MITIGATION`` names rules, e.g.::

    misaligned_persona=ablate@flagged          remove the component along v̂ once flagged
    misaligned_persona=steer:4@always,toxic=ablate@always

``@always`` mitigates every token of the request; ``@flagged`` only the response tokens once the
request's running response mean crosses the feature's calibrated threshold (decided in the op, on
the device, from the projection it just computed). A request can opt out or choose its own rules
with ``extra_args`` (the OpenAI-compatible server's ``vllm_xargs``)::

    {"misalign_mitigation": "off"}                       this request unmitigated
    {"misalign_mitigation": "misaligned_persona=steer:8@always"}   these rules instead

``MISALIGN_TAP_MITIGATION_DEFAULT=off`` makes mitigation opt-in: only requests that ask get it.
Host side, once per step before the forward, ``write_controls`` fills the op's control rows; after
it, ``observe`` updates each request's running sums and counts the rows the op changed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from detectors.bundle import Bundle
from tap.projection_op import ABLATE, CTL_BLOCKS, GATED, PREV_SUM, STEER, ctl_width
from tap.settings import TapConfigError

Mode = Literal["ablate", "steer"]
When = Literal["always", "flagged"]
_RULE = re.compile(
    r"^(?P<feature>[a-z][a-z0-9_]*)=(?P<mode>ablate|steer)(?::(?P<alpha>[0-9.eE+-]+))?"
    r"@(?P<when>always|flagged)$"
)
EXTRA_ARG = "misalign_mitigation"
SALT = "misalign-mitigation:"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    feature: int
    name: str
    mode: Mode
    alpha: float
    when: When

    @property
    def label(self) -> str:
        alpha = f":{self.alpha:g}" if self.mode == "steer" else ""
        return f"{self.mode}{alpha}:{self.name}@{self.when}"


def parse_rules(text: str, bundle: Bundle, where: str) -> tuple[Rule, ...]:
    """``text`` as rules for ``bundle``'s features; errors name ``where`` the text came from."""
    rules: list[Rule] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _RULE.match(part)
        if m is None:
            raise TapConfigError(
                f"misalign tap: {where}: {part!r} is not FEATURE=ablate@WHEN or "
                "FEATURE=steer:ALPHA@WHEN (WHEN: always or flagged)"
            )
        name = m["feature"]
        if name not in bundle.feature_names:
            raise TapConfigError(
                f"misalign tap: {where}: feature {name!r} is not in bundle {bundle.bundle_id} "
                f"(features: {', '.join(bundle.feature_names)})"
            )
        mode: Mode = "ablate" if m["mode"] == "ablate" else "steer"
        if mode == "steer" and m["alpha"] is None:
            raise TapConfigError(f"misalign tap: {where}: {part!r}: steer needs :ALPHA")
        try:
            alpha = float(m["alpha"]) if m["alpha"] is not None else 0.0
        except ValueError:
            raise TapConfigError(
                f"misalign tap: {where}: {part!r}: ALPHA is not a number"
            ) from None
        when: When = "flagged" if m["when"] == "flagged" else "always"
        if any(r.name == name for r in rules):
            raise TapConfigError(f"misalign tap: {where}: feature {name!r} has two rules")
        index = bundle.feature_names.index(name)
        agg = bundle.spec.features[index].aggregation
        if when == "flagged" and (agg.span, agg.reduce) != ("response", "mean"):
            # The op's gate is the running response mean; a threshold calibrated for another
            # statistic would open it at the wrong time.
            raise TapConfigError(
                f"misalign tap: {where}: {part!r}: @flagged needs the feature scored as the "
                f"response mean, but bundle {bundle.bundle_id} scores {name!r} as "
                f"{agg.span} {agg.reduce}; use @always"
            )
        rules.append(Rule(index, name, mode, alpha, when))
    return tuple(rules)


def rules_label(rules: tuple[Rule, ...]) -> str:
    """The label a request's rules go by in the sidecar's marks ("" for none)."""
    return ",".join(rule.label for rule in rules)


@dataclass
class _Request:
    rules: tuple[Rule, ...]
    ctl: np.ndarray  # [ctl_width]: this request's control row, prev sums and count filled per step
    resp_sum: np.ndarray  # [k] sum of response-token activations seen so far
    resp_n: int = 0
    # Positions below this are in the sums: a preempted request's recomputed rows come again.
    next_pos: int = 0


@dataclass
class Mitigation:
    bundle: Bundle
    default_rules: tuple[Rule, ...]
    default_on: bool
    _requests: dict[str, _Request] = field(default_factory=dict)
    # steps observed whose sums are not added yet: (ids, offsets, positions, roles, activations,
    # ready)
    _behind: list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray, Any, Any]] = field(
        default_factory=list
    )

    @property
    def k(self) -> int:
        return self.bundle.k

    def _request(self, req_id: str, runner: Any) -> _Request:
        r = self._requests.get(req_id)
        if r is None:
            r = self._requests[req_id] = self._new(req_id, _extra_args(runner, req_id))
        return r

    def rules_for(self, req_id: str, extra: dict[str, Any]) -> tuple[Rule, ...]:
        """The rules a request with these ``extra_args`` gets."""
        asked = extra.get(EXTRA_ARG)
        if asked is None:
            return self.default_rules if self.default_on else ()
        if str(asked) == "off":
            return ()
        if str(asked) == "on":
            return self.default_rules
        try:
            return parse_rules(str(asked), self.bundle, f"request {req_id} {EXTRA_ARG}")
        except TapConfigError:
            return ()  # a bad per-request value must not fail the engine step

    def _new(self, req_id: str, extra: dict[str, Any]) -> _Request:
        rules = self.rules_for(req_id, extra)
        k = self.k
        ctl = np.zeros(ctl_width(k), np.float32)
        for rule in rules:
            if rule.mode == "ablate":
                ctl[ABLATE * k + rule.feature] = 1.0
            else:
                ctl[STEER * k + rule.feature] = rule.alpha
            ctl[GATED * k + rule.feature] = 1.0 if rule.when == "flagged" else 0.0
        return _Request(rules, ctl, np.zeros(k, np.float64))

    def controls(
        self, runner: Any, req_ids: list[str], offsets: np.ndarray, roles: np.ndarray
    ) -> np.ndarray:
        """Control rows ``[n, ctl_width]`` for the step about to run."""
        self._catch_up()
        k = self.k
        per_req = np.zeros((len(req_ids), ctl_width(k)), np.float32)
        for i, rid in enumerate(req_ids):
            r = self._request(rid, runner)
            if r.rules:
                per_req[i] = r.ctl
                per_req[i, PREV_SUM * k : (PREV_SUM + 1) * k] = r.resp_sum
                per_req[i, -1] = r.resp_n
        rows = np.repeat(per_req, np.diff(offsets), axis=0)
        # A gated feature never touches the prompt: "flagged" is a property of the answer.
        gated = rows[:, GATED * k : (GATED + 1) * k] > 0
        prompt = (roles == 0)[:, None]
        for block in (ABLATE, STEER):
            cols = rows[:, block * k : (block + 1) * k]
            cols[gated & prompt] = 0.0
        assert rows.shape[1] == CTL_BLOCKS * k + 1
        return rows

    def labels(self, req_ids: list[str]) -> list[str]:
        """Each request's label ("" unmitigated) for the batch the sidecar gets."""
        out = []
        for rid in req_ids:
            r = self._requests.get(rid)
            out.append(rules_label(r.rules) if r is not None else "")
        return out

    def observe(
        self,
        req_ids: list[str],
        offsets: np.ndarray,
        positions: np.ndarray,
        roles: np.ndarray,
        activations: Any,
        ready: Any = None,
    ) -> None:
        """After the step: its activations (an array, or a host tensor that a device copy fills
        until the event ``ready``) for the running response sums of the next step's gate. They
        are added when the next step asks for its controls, so the engine thread waits for the
        copy only then, if at all."""
        self._behind.append((req_ids, offsets, positions, roles, activations, ready))

    def _catch_up(self) -> None:
        behind, self._behind = self._behind, []
        for req_ids, offsets, positions, roles, activations, ready in behind:
            if ready is not None:
                ready.synchronize()
            act = np.asarray(activations)
            for i, rid in enumerate(req_ids):
                r = self._requests.get(rid)
                if r is None or not r.rules:
                    continue
                sl = slice(int(offsets[i]), int(offsets[i + 1]))
                pos = positions[sl]
                new = (roles[sl] == 1) & (pos >= r.next_pos)
                r.resp_sum += act[sl][new].sum(axis=0, dtype=np.float64)
                r.resp_n += int(new.sum())
                if len(pos):
                    r.next_pos = max(r.next_pos, int(pos.max()) + 1)

    def forget(self, req_ids: set[str]) -> None:
        """Requests the scheduler finished (it tells the worker in the next step's output)."""
        for rid in req_ids:
            self._requests.pop(rid, None)


def salted(
    mitigation: Mitigation, req_id: str, extra: dict[str, Any], salt: str | None
) -> str | None:
    """The prefix-cache salt for a request: its own, plus its mitigation rules if it has any."""
    label = rules_label(mitigation.rules_for(req_id, extra))
    if not label:
        return salt
    return f"{salt}|{SALT}{label}" if salt else SALT + label


def salt_prefix_cache(mitigation: Mitigation) -> None:
    """Keep requests mitigated differently from sharing prefix-cache blocks.

    A cached block holds keys and values computed from the residual stream as the request that
    filled it left it: blocks filled under ablation would hand an unmitigated request mitigated
    context (and cached tokens never pass through the op again). vLLM hashes ``cache_salt`` into a
    request's first block, so salting by the rules gives each rule set its own cache. This runs in
    the engine-core process, where requests are made and their blocks hashed.
    """
    from vllm.v1.request import Request

    orig = Request.from_engine_core_request.__func__  # type: ignore[attr-defined]
    if getattr(orig, "_misalign_salted", False):
        return

    def from_engine_core_request(cls: Any, request: Any, block_hasher: Any) -> Any:
        try:
            params = request.sampling_params
            extra = dict(params.extra_args or {}) if params is not None else {}
            request.cache_salt = salted(mitigation, request.request_id, extra, request.cache_salt)
        except Exception:
            log.exception("misalign tap: could not salt request %s's prefix cache", request)
        return orig(cls, request, block_hasher)

    from_engine_core_request._misalign_salted = True  # type: ignore[attr-defined]
    Request.from_engine_core_request = classmethod(from_engine_core_request)  # type: ignore[assignment,method-assign]


def _extra_args(runner: Any, req_id: str) -> dict[str, Any]:
    state = getattr(runner, "requests", {}).get(req_id)
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    return dict(extra) if extra else {}
