"""The offline reader for real models (issue 15): the dtype a model is served in, accelerate's
device map, and batches by a token budget; and the CLI refusing bad values of each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors.activations import ActivationReader, ReaderOptions, TokenActivations
from detectors.errors import ModelError
from detectors.transcripts import Transcript, read_jsonl
from tests.support.cli_runs import assert_user_error, run
from tests.support.planted import labeled_records, write_jsonl

LAYERS = [2, 4]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "labeled.jsonl", labeled_records(12))


@pytest.fixture(scope="module")
def records(data: Path) -> list[Transcript]:
    return read_jsonl(data)


def read(model: Path, records: list[Transcript], **opts: object) -> list[TokenActivations]:
    reader = ActivationReader(model, options=ReaderOptions(**opts))  # type: ignore[arg-type]
    return list(reader.read(records, LAYERS, progress=False))


def worst_relative_error(got: list[TokenActivations], ref: list[TokenActivations]) -> float:
    """The largest per-token ||got - ref|| / ||ref|| over every record and layer."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert np.array_equal(g.token_ids, r.token_ids) and np.array_equal(g.roles, r.roles)
        for lay in LAYERS:
            assert g.layers[lay].dtype == np.float32
            err = np.linalg.norm(g.layers[lay] - r.layers[lay], axis=1)
            worst = max(worst, float((err / np.linalg.norm(r.layers[lay], axis=1)).max()))
    return worst


# The unit roundoff of each dtype (2^-8 and 2^-11), and how many of them four layers may add up.
@pytest.mark.parametrize(("dtype", "eps"), [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_half_precision_activations_match_float32_within_the_dtypes_precision(
    planted_model: Path, records: list[Transcript], dtype: str, eps: float
) -> None:
    import torch

    ref = read(planted_model, records)
    reader = ActivationReader(planted_model, options=ReaderOptions(dtype=dtype))  # type: ignore[arg-type]
    assert next(reader.model.parameters()).dtype == getattr(torch, dtype)
    got = list(reader.read(records, LAYERS, progress=False))
    err = worst_relative_error(got, ref)
    # Read in that dtype (not float32 again), and within a few roundoffs of float32.
    assert eps / 8 < err < 8 * eps, err


def test_token_budget_batches_stay_within_it_and_read_what_fixed_batches_read(
    planted_model: Path, records: list[Transcript]
) -> None:
    ref = read(planted_model, records)
    reader = ActivationReader(planted_model, options=ReaderOptions(token_budget=96))
    shapes: list[tuple[int, int]] = []
    forward = reader._forward

    def spy(ids, mask, layers):  # type: ignore[no-untyped-def]
        shapes.append(tuple(ids.shape))
        return forward(ids, mask, layers)

    reader._forward = spy  # type: ignore[method-assign]
    got = list(reader.read(records, LAYERS, progress=False))
    assert worst_relative_error(got, ref) < 1e-5
    assert sum(r for r, _ in shapes) == len(records)
    assert all(r * w <= 96 or r == 1 for r, w in shapes), shapes
    assert any(r > 1 for r, _ in shapes) and len(shapes) > 1, shapes


def test_device_map_auto_places_the_model_with_accelerate_and_reads_the_same(
    planted_model: Path, records: list[Transcript]
) -> None:
    ref = read(planted_model, records)
    # On this machine's one CPU accelerate places every layer there (transformers 5 keeps no
    # hf_device_map); on a GPU host the layers spread over the GPUs and inputs go to the first.
    reader = ActivationReader(planted_model, options=ReaderOptions(device_map="auto"))
    assert {p.device.type for p in reader.model.parameters()} == {"cpu"}
    assert reader.device.type == "cpu"
    got = list(reader.read(records, LAYERS, progress=False))
    assert worst_relative_error(got, ref) < 1e-5


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ({"dtype": "int8"}, "dtype: expected one of bfloat16, float16, float32, got 'int8'"),
        ({"device_map": "balanced"}, "device_map: expected 'auto'"),
        ({"device_map": "auto", "device": "cuda"}, "drop device 'cuda'"),
        ({"token_budget": 0}, "token_budget: expected a positive count, got 0"),
    ],
)
def test_reader_options_refuse_bad_values_naming_them(opts: dict[str, object], needle: str) -> None:
    with pytest.raises(ModelError, match=needle):
        ReaderOptions(**opts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--dtype", "int8"], ["'--dtype'", "'int8'", "bfloat16"]),
        (["--device-map", "balanced"], ["'--device-map'", "'balanced'"]),
        (
            ["--device-map", "auto", "--device", "cuda"],
            ["Invalid value for --device-map", "--device cuda"],
        ),
        (["--token-budget", "0"], ["'--token-budget'", "0"]),
    ],
)
def test_the_cli_refuses_bad_reader_values_with_exit_2_naming_the_flag(
    planted_model: Path, data: Path, args: list[str], needles: list[str]
) -> None:
    assert_user_error(run("score", "--data", data, "--model", planted_model, *args), *needles)


def test_the_cli_reads_in_bfloat16_by_a_token_budget(
    planted_model: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b.safetensors"
    common = ("extract", "--method", "diff-means", "--data", data, "--feature", "planted")
    p = run(*common, "--layer", "2", "--out", out, "--model", planted_model,
            "--dtype", "bfloat16", "--token-budget", "128")  # fmt: skip
    assert p.returncode == 0 and out.exists(), p.stderr
