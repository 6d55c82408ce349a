"""Finding decoder layers and reading their output, on torch modules built in the test.

The real architectures run in tests/tap/test_vllm_tap.py (vLLM) and tests/detectors/test_smollm2.py
(transformers); here, the two output forms and the refusals, without a model to load.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.synthetic import synthetic_bundle
from detectors import bundle as bundle_io
from detectors.bundle import ModelRef
from detectors.decoder_layers import find_decoder_layers
from detectors.errors import TapConfigError
from tap import layer_tap, projection_op, runner_hook, state
from tap.settings import TapSettings

D, LAYERS = 8, 3


class PairLayer(torch.nn.Module):
    """As vLLM's Llama layer: returns (hidden, residual), the last add deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


class StreamLayer(PairLayer):
    """As vLLM's GPT-2 and Granite layers: returns the residual stream itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x + self.lin(x)


class TripleLayer(PairLayer):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.lin(x), x, x


class Model(torch.nn.Module):
    def __init__(self, layer: type[torch.nn.Module], where: str = "model") -> None:
        super().__init__()
        inner = torch.nn.Module()
        inner.layers = torch.nn.ModuleList(layer() for _ in range(LAYERS))
        # a deeper list of the same length (a MoE layer's experts) is not the decoder list
        inner.layers[0].experts = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(LAYERS))
        setattr(self, where, inner)


def bundle(tmp_path: Path) -> bundle_io.Bundle:
    ref = ModelRef(name="toy", hidden_size=D, num_layers=LAYERS, architecture="Toy")
    return synthetic_bundle(tmp_path / "b.safetensors", ref, 2, 2, 1.0)


@pytest.mark.parametrize("where", ["model", "transformer"])
def test_the_shallowest_list_of_num_layers_modules_is_the_decoder_list_of_modules_built_in_test(
    where: str,
) -> None:
    model = Model(PairLayer, where)
    assert find_decoder_layers(model, LAYERS) == list(getattr(model, where).layers)
    assert "no list of 4 modules" in str(find_decoder_layers(model, 4))


@pytest.mark.parametrize(("layer", "pair"), [(PairLayer, True), (StreamLayer, False)])
def test_both_output_forms_project_the_residual_stream_of_modules_built_in_test(
    tmp_path: Path, layer: type[PairLayer], pair: bool
) -> None:
    projection_op.register()
    b = bundle(tmp_path)
    model = Model(layer)
    x = torch.randn(5, D)
    with torch.inference_mode():  # as vLLM runs its forward
        want = model.model.layers[1](x)
        stream = (want[0] + want[1]) if pair else want
        target = layer_tap.attach(model, b, rows=16, mitigate=False)
        assert target is model.model.layers[1]
        out = target(x)
    if pair:
        assert isinstance(out, tuple)
        torch.testing.assert_close(out[0] + out[1], stream)
    else:
        torch.testing.assert_close(out, stream)  # returned unchanged
    expect = stream.detach().numpy() @ b.directions.T + b.bias
    np.testing.assert_allclose(target.tap_out[:5].numpy(), expect, rtol=1e-5, atol=1e-5)


def test_a_layer_of_another_output_is_refused_naming_its_class_of_modules_built_in_test(
    tmp_path: Path,
) -> None:
    projection_op.register()
    model = Model(TripleLayer)
    target = layer_tap.attach(model, bundle(tmp_path), rows=16, mitigate=False)
    with (
        torch.inference_mode(),
        pytest.raises(TapConfigError, match=r"test_layer_tap\.TripleLayer returns tuple of 3"),
    ):
        target(torch.randn(2, D))


def test_a_model_without_a_decoder_list_is_refused_naming_its_class_of_modules_built_in_test(
    tmp_path: Path,
) -> None:
    with pytest.raises(TapConfigError, match="Linear has no list of 3 modules"):
        layer_tap.attach(torch.nn.Linear(D, D), bundle(tmp_path), rows=16, mitigate=False)


def runner_stand_in(pp: int) -> SimpleNamespace:
    """The attributes of a model runner that the load check reads (vLLM's config objects)."""
    hf = SimpleNamespace(hidden_size=D, num_hidden_layers=LAYERS)
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
    )


def test_pipeline_parallelism_is_refused_at_load_on_a_runner_stand_in(tmp_path: Path) -> None:
    cfg = state.Active(TapSettings(bundle=tmp_path / "b.safetensors"), bundle(tmp_path))
    runner_hook._check_model(runner_stand_in(1), cfg, v2=False)
    with pytest.raises(TapConfigError, match=r"pipeline parallelism \(pipeline_parallel_size=2\)"):
        runner_hook._check_model(runner_stand_in(2), cfg, v2=False)


def test_mitigation_under_model_runner_v2_is_refused_at_load_on_a_runner_stand_in(
    tmp_path: Path,
) -> None:
    cfg = state.Active(TapSettings(bundle=tmp_path / "b.safetensors"), bundle(tmp_path))
    cfg.mitigation = object()
    runner_hook._check_model(runner_stand_in(1), cfg, v2=False)
    with pytest.raises(TapConfigError, match="MISALIGN_TAP_MITIGATION is not supported under"):
        runner_hook._check_model(runner_stand_in(1), cfg, v2=True)


def test_a_multi_layer_bundle_writes_each_layers_columns_of_one_buffer_of_modules_built_in_test(
    tmp_path: Path,
) -> None:
    from tests.support.tiny_models import multi_layer_bundle

    projection_op.register()
    ref = ModelRef(name="toy", hidden_size=D, num_layers=LAYERS, architecture="Toy")
    b = multi_layer_bundle(tmp_path / "m.safetensors", ref, (1, 3))
    model = Model(StreamLayer)
    layers = model.model.layers
    x = torch.randn(5, D)
    with torch.inference_mode():
        want = {1: layers[0](x)}
        want[2] = layers[1](want[1])
        want[3] = layers[2](want[2])
        target = layer_tap.attach(model, b, rows=16, mitigate=False)
        assert target is layers[2] and layer_tap.attach(model, b, 16, False) is target
        assert layers[0].tap_out is target.tap_out and not hasattr(layers[1], "tap_out")
        h = x
        for layer in layers:
            h = layer(h)
    torch.testing.assert_close(h, want[3])  # the stream is unchanged
    from detectors.scoring import project, token_scores

    expect = token_scores(b, project(b, {k: v.numpy() for k, v in want.items()}))
    np.testing.assert_allclose(target.tap_out[:5].numpy(), expect, rtol=1e-5, atol=1e-5)
    assert (expect[:, 2] == 0).any() or (expect[:, 2] > 0.02).all()  # JumpReLU applied
    with pytest.raises(TapConfigError, match=r"reads layers \[1, 3\]"):
        layer_tap.attach(Model(StreamLayer), b, rows=16, mitigate=True)


@pytest.mark.parametrize("mitigate", [False, True])
def test_the_benchs_pause_skips_the_op_and_the_host_side_and_counts_the_steps_of_modules_built_in_test(
    tmp_path: Path, mitigate: bool
) -> None:
    """bench/tap_overhead.py's within-engine switch: paused, the op leaves its buffers and the
    residual stream alone and the host side sends nothing; the step is counted as paused (and
    attempted, so the worker's self-check does not count it as uncaptured)."""
    projection_op.register()
    b = bundle(tmp_path)
    model = Model(PairLayer)
    x = torch.randn(5, D)
    cfg = state.activate(TapSettings(bundle=b.path, sidecar="127.0.0.1:9"), b)
    try:
        target = layer_tap.attach(model, b, rows=16, mitigate=mitigate)
        cfg.layer = target
        if mitigate:
            target.tap_ctl[:5, 0] = 1.0  # ablate feature 0 on every row, were the op to run
        cfg.paused = True
        with torch.inference_mode():
            _, residual = target(x)
        assert float(target.tap_out.abs().max()) == 0.0
        torch.testing.assert_close(residual, x)  # not mitigated either
        runner_hook._capture_step(None, 5, lambda: pytest.fail("the layout was read"))
        assert (cfg.steps_paused, cfg.steps_captured, cfg.publisher) == (1, 1, None)
        cfg.paused = False
        with torch.inference_mode():
            target(x)
        assert float(target.tap_out[:5].abs().min()) > 0.0  # on again: every row written
    finally:
        state._ACTIVE = None
