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
``MISALIGN_TAP_MITIGATION_CLIENTS`` limits what a request may ask, since whoever calls the API
sends ``extra_args``: ``on`` (the default: only switch mitigation on), ``switch`` (on or off),
``rules`` (on, off or its own rules), ``none`` (nothing: the operator's rules for all). An ask the
policy does not allow, or a malformed one, is refused: the request gets what it would have got
without asking, and the refusal is counted (``Mitigation.refused``) and logged once per reason.
``steer`` strengths are finite, positive (a negative one would steer *toward* the feature) and at
most ``MISALIGN_TAP_MITIGATION_MAX_ALPHA`` (default ``DEFAULT_MAX_ALPHA``), for the operator's
rules (refused at start) as for a request's.
Host side, once per step before the forward, ``write_controls`` fills the op's control rows; after
it, ``observe`` updates each request's running sums and counts the rows the op changed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from detectors.bundle import Bundle
from detectors.errors import TapConfigError
from detectors.roles import PROMPT, RESPONSE
from tap import state
from tap.projection_op import ABLATE, CTL_BLOCKS, GATED, PREV_SUM, STEER, ctl_width
from tap.settings import DEFAULT_MAX_ALPHA, ClientChoice, TapSettings

Mode = Literal["ablate", "steer"]
When = Literal["always", "flagged"]
_RULE = re.compile(
    r"^(?P<feature>[a-z][a-z0-9_]*)=(?P<mode>ablate|steer)(?::(?P<alpha>[0-9.eE+-]+))?"
    r"@(?P<when>always|flagged)$"
)
EXTRA_ARG = "misalign_mitigation"
_REFUSED = {
    "off": "switching mitigation off",
    "rules": "choosing its own rules",
    "malformed": f"a malformed {EXTRA_ARG}",
}
# Salts are keyed: a client cannot send a salt that lands its blocks among mitigated requests'.
_SALT_KEY = os.urandom(16)
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


def parse_rules(
    text: str, bundle: Bundle, where: str, max_alpha: float = DEFAULT_MAX_ALPHA
) -> tuple[Rule, ...]:
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
        if mode == "steer" and not (math.isfinite(alpha) and 0 < alpha <= max_alpha):
            # steer moves x by -alpha along the unit direction: alpha <= 0 would leave the
            # feature or push toward it, and 1e999 parses as infinity.
            raise TapConfigError(
                f"misalign tap: {where}: {part!r}: ALPHA must be a finite number above 0 and at "
                f"most {max_alpha:g} (MISALIGN_TAP_MITIGATION_MAX_ALPHA)"
            )
        when: When = "flagged" if m["when"] == "flagged" else "always"
        if any(r.name == name for r in rules):
            raise TapConfigError(f"misalign tap: {where}: feature {name!r} has two rules")
        index = bundle.feature_names.index(name)
        agg = bundle.spec.features[index].aggregation
        if when == "flagged" and bundle.spec.features[index].calibration is None:
            raise TapConfigError(
                f"misalign tap: {where}: {part!r}: @flagged needs a threshold, and {name!r} "
                f"has no calibration in bundle {bundle.bundle_id}; use @always"
            )
        if when == "flagged" and bundle.spec.features[index].head is not None:
            # The op's gate is the feature's own running mean; a head's threshold is on the head.
            raise TapConfigError(
                f"misalign tap: {where}: {part!r}: @flagged needs the feature scored by its own "
                f"direction, but bundle {bundle.bundle_id} scores {name!r} by a head; use @always"
            )
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
    """One request's rules and, if a rule waits for the flag, its response activations.

    They are kept by position: a row that comes again (recomputed after preemption, or the real
    token where a rejected speculative draft was) replaces the earlier one, and the gate of a row
    at position q counts exactly the kept rows below q.
    """

    rules: tuple[Rule, ...]
    ctl: np.ndarray  # [ctl_width]: this request's control row, prev sums and count filled per step
    acts: np.ndarray  # [capacity, k] float64: response activations by position
    seen: np.ndarray  # [capacity] bool: which positions ``acts`` holds
    resp_sum: np.ndarray  # [k] sum of the kept activations
    resp_n: int = 0
    next_pos: int = 0  # one past the highest position kept

    @property
    def gated(self) -> bool:
        return any(rule.when == "flagged" for rule in self.rules)

    def keep(self, pos: np.ndarray, act: np.ndarray) -> None:
        """Response rows at positions ``pos`` (distinct) with activations ``act [m, k]``."""
        if not len(pos):
            return
        top = int(pos.max()) + 1
        if top > len(self.seen):
            cap = max(top, 2 * len(self.seen), 64)
            acts, seen = np.zeros((cap, self.acts.shape[1])), np.zeros(cap, bool)
            acts[: len(self.acts)], seen[: len(self.seen)] = self.acts, self.seen
            self.acts, self.seen = acts, seen
        again = pos[self.seen[pos]]
        if len(again):
            self.resp_sum -= self.acts[again].sum(axis=0)
            self.resp_n -= len(again)
        self.acts[pos] = act
        self.seen[pos] = True
        self.resp_sum += act.sum(axis=0, dtype=np.float64)
        self.resp_n += len(pos)
        self.next_pos = max(self.next_pos, top)

    def before(self, q: int) -> tuple[np.ndarray, int]:
        """Sum and count of the kept rows at positions below ``q``."""
        if q >= self.next_pos:
            return self.resp_sum, self.resp_n
        mask = self.seen[:q]
        return self.acts[:q][mask].sum(axis=0), int(mask.sum())


@dataclass
class Mitigation:
    bundle: Bundle
    default_rules: tuple[Rule, ...]
    default_on: bool
    # What a request may choose (tap.settings.ClientChoice): only "on" unless the operator allows
    # more, since whoever calls the API sends extra_args.
    clients: ClientChoice = "on"
    max_alpha: float = DEFAULT_MAX_ALPHA
    # asks refused, by reason: "off" / "rules" (not allowed), "malformed"
    refused: Counter[str] = field(default_factory=Counter)
    _requests: dict[str, _Request] = field(default_factory=dict)
    # steps observed whose sums are not added yet: (ids, offsets, positions, roles, activations,
    # ready)
    _behind: list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray, Any, Any]] = field(
        default_factory=list
    )

    @classmethod
    def from_settings(cls, settings: TapSettings, bundle: Bundle) -> Mitigation:
        """The operator's mitigation; a bad rule stops the engine at start."""
        max_alpha = settings.mitigation_max_alpha
        rules = parse_rules(settings.mitigation, bundle, "MISALIGN_TAP_MITIGATION", max_alpha)
        return cls(
            bundle,
            rules,
            settings.mitigation_default == "on",
            settings.mitigation_clients,
            max_alpha,
        )

    @property
    def k(self) -> int:
        return self.bundle.k

    def _request(self, req_id: str, runner: Any) -> _Request:
        r = self._requests.get(req_id)
        if r is None:
            r = self._requests[req_id] = self._new(req_id, _extra_args(runner, req_id))
        return r

    def rules_for(self, req_id: str, extra: dict[str, Any], count: bool = True) -> tuple[Rule, ...]:
        """The rules a request with these ``extra_args`` gets: its ask where the policy allows
        it, else (refused; counted unless ``count`` is False) what it would get without asking."""
        asked = extra.get(EXTRA_ARG)
        default = self.default_rules if self.default_on else ()
        if asked is None or self.clients == "none":
            return default
        text = str(asked)
        refusal, why = None, ""
        if text == "on":
            return self.default_rules
        if text == "off":
            if self.clients in ("switch", "rules"):
                return ()
            refusal = "off"
        elif self.clients != "rules":
            refusal = "rules"
        else:
            try:
                return parse_rules(
                    text, self.bundle, f"request {req_id} {EXTRA_ARG}", self.max_alpha
                )
            except TapConfigError as exc:
                # A bad per-request value must not fail the engine step, nor unmitigate it.
                refusal, why = "malformed", f": {exc}"
        if count:
            if not self.refused[refusal]:
                log.warning(
                    "misalign tap: request %s: %s refused (MISALIGN_TAP_MITIGATION_CLIENTS=%s)%s;"
                    " it gets the default. Further refusals are counted, not logged.",
                    req_id,
                    _REFUSED[refusal],
                    self.clients,
                    why,
                )
            self.refused[refusal] += 1
        return default

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
        return _Request(rules, ctl, np.zeros((0, k)), np.zeros(0, bool), np.zeros(k, np.float64))

    def controls(
        self,
        runner: Any,
        req_ids: list[str],
        offsets: np.ndarray,
        positions: np.ndarray,
        roles: np.ndarray,
    ) -> np.ndarray:
        """Control rows ``[n, ctl_width]`` for the step about to run."""
        self._catch_up()
        k = self.k
        per_req = np.zeros((len(req_ids), ctl_width(k)), np.float32)
        for i, rid in enumerate(req_ids):
            r = self._request(rid, runner)
            if r.rules:
                per_req[i] = r.ctl
                if r.gated and offsets[i] < offsets[i + 1]:
                    total, n = r.before(int(positions[offsets[i]]))
                    per_req[i, PREV_SUM * k : (PREV_SUM + 1) * k] = total
                    per_req[i, -1] = n
        rows = np.repeat(per_req, np.diff(offsets), axis=0)
        # A gated feature never touches the prompt: "flagged" is a property of the answer.
        gated = rows[:, GATED * k : (GATED + 1) * k] > 0
        prompt = (roles == PROMPT)[:, None]
        for block in (ABLATE, STEER):
            cols = rows[:, block * k : (block + 1) * k]
            cols[gated & prompt] = 0.0
        assert rows.shape[1] == CTL_BLOCKS * k + 1
        return rows

    def any_gated(self, req_ids: list[str]) -> bool:
        """Whether a rule of these requests waits for the flag (and so needs their rows)."""
        return any((r := self._requests.get(rid)) is not None and r.gated for rid in req_ids)

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
        copy only then, and only if a request of the step has a rule that waits for the flag."""
        self._behind.append((req_ids, offsets, positions, roles, activations, ready))

    def _catch_up(self) -> None:
        behind, self._behind = self._behind, []
        for req_ids, offsets, positions, roles, activations, ready in behind:
            todo = [
                (i, r)
                for i, rid in enumerate(req_ids)
                if (r := self._requests.get(rid)) is not None and r.gated
            ]
            if not todo:
                continue
            if ready is not None:
                ready.synchronize()
            act = np.asarray(activations)
            for i, r in todo:
                sl = slice(int(offsets[i]), int(offsets[i + 1]))
                resp = roles[sl] == RESPONSE
                r.keep(positions[sl][resp], act[sl][resp])

    def forget(self, req_ids: set[str]) -> None:
        """Requests the scheduler finished (it tells the worker in the next step's output)."""
        for rid in req_ids:
            self._requests.pop(rid, None)


def salted(
    mitigation: Mitigation, req_id: str, extra: dict[str, Any], salt: str | None
) -> str | None:
    """The prefix-cache salt for a request: its own if it is unmitigated, else a keyed digest of
    its own and its rules (short, of the characters vLLM allows in a salt, unforgeable)."""
    rules = mitigation.rules_for(req_id, extra, count=False)  # the worker counts refusals
    if not rules:
        return salt
    canon = ",".join(sorted(f"{r.name}={r.mode}:{r.alpha!r}@{r.when}" for r in rules))
    digest = hmac.new(_SALT_KEY, f"{salt or ''}\0{canon}".encode(), hashlib.sha256)
    return "misalign-" + digest.hexdigest()[:40]


def salt_prefix_cache() -> None:
    """Keep requests mitigated differently from sharing prefix-cache blocks.

    A cached block holds keys and values computed from the residual stream as the request that
    filled it left it: blocks filled under ablation would hand an unmitigated request mitigated
    context (and cached tokens never pass through the op again). vLLM hashes ``cache_salt`` into a
    request's first block, and each block's hash into the next, so salting by the rules gives
    each rule set its own cache. This runs in the engine-core process, where requests are made and
    their blocks hashed, with the process's mitigation at the time each request arrives.
    """
    from vllm.v1.request import Request

    orig = Request.from_engine_core_request.__func__  # type: ignore[attr-defined]
    if getattr(orig, "_misalign_salted", False):
        return

    def from_engine_core_request(cls: Any, request: Any, block_hasher: Any) -> Any:
        active = state.active()
        m = active.mitigation if active is not None else None
        if m is not None:
            try:
                params = request.sampling_params
                extra = dict(params.extra_args or {}) if params is not None else {}
                request.cache_salt = salted(m, request.request_id, extra, request.cache_salt)
            except Exception:
                # Unsalted, it might share blocks across rule sets; alone, it shares with none.
                request.cache_salt = "misalign-unshared-" + uuid.uuid4().hex
                log.exception("misalign tap: could not salt request %s", request.request_id)
        return orig(cls, request, block_hasher)

    from_engine_core_request._misalign_salted = True  # type: ignore[attr-defined]
    Request.from_engine_core_request = classmethod(from_engine_core_request)  # type: ignore[assignment,method-assign]


def _extra_args(runner: Any, req_id: str) -> dict[str, Any]:
    state = getattr(runner, "requests", {}).get(req_id)
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    return dict(extra) if extra else {}
