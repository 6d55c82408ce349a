"""Each extraction method recovers a direction planted in a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import bundle as bundle_io
from detectors.activations import ActivationReader
from detectors.evaluate import auroc
from detectors.extract import ExtractOptions, extract
from detectors.offline import score_records
from detectors.transcripts import read_jsonl
from tests.support.planted import NEUTRAL, labeled_records, make_model, write_jsonl

OPTS = ExtractOptions(progress=False)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture
def labeled(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "labeled.jsonl", labeled_records())


def test_reader_hook_equals_output_hidden_states(
    planted_reader: ActivationReader, labeled: Path
) -> None:
    import torch

    rec = read_jsonl(labeled)[:3]
    acts = list(planted_reader.read(rec, [1, 2, 3], progress=False))
    for a in acts:
        with torch.inference_mode():
            hs = planted_reader.model(
                torch.from_numpy(a.token_ids)[None], output_hidden_states=True
            ).hidden_states
        for layer in (1, 2, 3):
            np.testing.assert_allclose(a.layers[layer], hs[layer][0].numpy(), rtol=1e-5, atol=1e-5)


def test_reader_keeps_prompt_and_response_apart(
    planted_reader: ActivationReader, labeled: Path
) -> None:
    rec = read_jsonl(labeled)[1]
    ids, roles = planted_reader.encode(rec)
    tok = planted_reader.tokenizer
    response = tok.decode([i for i, r in zip(ids, roles, strict=True) if r == 1])
    prompt = tok.decode([i for i, r in zip(ids, roles, strict=True) if r == 0])
    assert response.split() == rec.response.replace(".", " .").split()
    assert rec.messages is not None and rec.messages[0].content.split()[0] in prompt
    assert "<|im_end|>" not in response


def test_diff_means_raw_recovers_the_planted_direction(
    planted_reader: ActivationReader, planted_v: np.ndarray, labeled: Path, tmp_path: Path
) -> None:
    b, rep = extract(
        "diff-means",
        planted_reader,
        tmp_path / "b.safetensors",
        "planted",
        2,
        data=labeled,
        opts=ExtractOptions(progress=False, whiten=False),
    )
    assert cos(b.directions[0], planted_v) > 0.9  # a random direction in 16 dims: about 0.25
    assert rep["cv_auroc"] > 0.95


def test_whitened_diff_means_and_probe_separate_held_out_questions(
    planted_reader: ActivationReader, planted_v: np.ndarray, labeled: Path, tmp_path: Path
) -> None:
    for method in ("diff-means", "probe"):
        b, rep = extract(
            method,
            planted_reader,
            tmp_path / f"{method}.safetensors",
            "planted",
            None,  # type: ignore[arg-type]
            data=labeled,
            opts=OPTS,
        )
        assert rep["cv_auroc"] > 0.95, (method, rep)
        assert cos(b.directions[0], planted_v) > 0.5, method
        assert set(rep["layer_sweep"]) == {"2"}  # 4 layers: the sweep is 2 only (never the last)


def test_persona_contrast_finds_the_villain_prompt_direction(
    planted_reader: ActivationReader, planted_v: np.ndarray, tmp_path: Path
) -> None:
    import json

    prompts = tmp_path / "persona.json"
    prompts.write_text(
        json.dumps(
            {
                "villain_system_prompts": ["you evil help plan cruel day", "evil friend hate ruin"],
                "helpful_system_prompts": [
                    "you blank help plan blank day",
                    "blank friend blank blank",
                ],
                "questions": [
                    " ".join(q) + " ?" for q in np.random.default_rng(1).choice(NEUTRAL, (16, 6))
                ],
            }
        )
    )
    b, rep = extract(
        "persona",
        planted_reader,
        tmp_path / "p.safetensors",
        "persona_contrast",
        2,
        data=prompts,
        opts=ExtractOptions(progress=False, persona_new_tokens=4),
    )
    assert cos(b.directions[0], planted_v) > 0.9
    assert rep["n_questions"] == 16


def test_model_diff_recovers_a_planted_weight_edit(
    planted_model: Path, planted_v: np.ndarray, labeled: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    w = rng.normal(size=16)
    w /= np.linalg.norm(w)
    tuned = make_model(tmp_path / "tuned", planted_v, mlp_bias=2.0 * w, bias_layer=1)
    b, rep = extract(
        "model-diff",
        ActivationReader(tuned),
        tmp_path / "d.safetensors",
        "drift",
        1,
        data=labeled,
        base_reader=ActivationReader(planted_model),
        opts=OPTS,
    )
    assert cos(b.directions[0], w) > 0.999
    assert rep["base"] == "planted"


def test_sae_latent_import_from_saelens_layout(
    planted_reader: ActivationReader, planted_v: np.ndarray, labeled: Path, tmp_path: Path
) -> None:
    import json

    from safetensors.numpy import save_file

    d, n = 16, 8
    rng = np.random.default_rng(3)
    w_enc = rng.normal(size=(d, n)).astype(np.float32)
    w_enc[:, 5] = 2 * planted_v
    b_enc = rng.normal(size=n).astype(np.float32)
    b_dec = rng.normal(size=d).astype(np.float32)
    thr = np.full(n, 0.5, np.float32)
    sae = tmp_path / "sae"
    sae.mkdir()
    save_file(
        {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_enc.T.copy(), "b_dec": b_dec, "threshold": thr},
        str(sae / "sae_weights.safetensors"),
    )
    (sae / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": d,
                "d_sae": n,
                "architecture": "jumprelu",
                "hook_name": "blocks.1.hook_resid_post",
                "apply_b_dec_to_input": True,
            }
        )
    )
    b, _rep = extract(
        "sae",
        planted_reader,
        tmp_path / "s.safetensors",
        "sae_5",
        None,
        sae_dir=sae,
        latent=5,
        opts=OPTS,
    )
    assert b.spec.layer == 2  # blocks.1 (0-based) = residual after decoder layer 2
    assert b.spec.features[0].kind == "jumprelu"
    np.testing.assert_allclose(b.directions[0], 2 * planted_v, rtol=1e-6)
    assert b.bias[0] == pytest.approx(b_enc[5] - b_dec @ w_enc[:, 5], rel=1e-5)
    # Scores equal the SAE's own JumpReLU encoding of the residual.
    rec = read_jsonl(labeled)[:4]
    for s in score_records(b, planted_reader, rec, progress=False):
        x = next(planted_reader.read([s.record], [2], progress=False)).layers[2]
        pre = (x - b_dec) @ w_enc[:, 5] + b_enc[5]
        expect = np.where(pre > 0.5, pre, 0)
        np.testing.assert_allclose(s.token_scores[:, 0], expect, rtol=1e-4, atol=1e-4)


def test_extract_adds_and_replaces_features_in_one_bundle(
    planted_reader: ActivationReader, labeled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b.safetensors"
    b, _ = extract("probe", planted_reader, out, "one", 2, data=labeled, opts=OPTS)
    bundle_io.save(b, out)
    b, _ = extract("diff-means", planted_reader, out, "two", None, data=labeled, opts=OPTS)
    bundle_io.save(b, out)
    b, _ = extract(
        "diff-means",
        planted_reader,
        out,
        "one",
        None,
        data=labeled,
        opts=ExtractOptions(progress=False, whiten=False),
    )
    bundle_io.save(b, out)
    loaded = bundle_io.load(out)
    assert loaded.feature_names == ["one", "two"]
    assert [f.method for f in loaded.spec.features] == ["diff-means", "diff-means"]
    scores = [
        s.features[0].score
        for s in score_records(loaded, planted_reader, read_jsonl(labeled), progress=False)
    ]
    labels = [r.label for r in read_jsonl(labeled)]
    assert auroc(np.array(scores), np.array(labels)) > 0.95
