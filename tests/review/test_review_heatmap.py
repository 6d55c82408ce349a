"""Token texts and shades of the heat map, with a real byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from review.heatmap import heat_map, token_texts
from review.store import parse_sample
from tests.support.review_data import tiny_tokenizer


def test_token_texts_read_back_as_the_text(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_tokenizer(tmp_path / "t.json")))
    text = "naïve café —\n🙂 <script>x</script>"
    ids = tok.encode("<|im_start|>" + text, add_special_tokens=False).ids
    texts = token_texts([tok.id_to_token(i) for i in ids])
    assert texts[0] == ("<|im_start|>", True)
    assert "".join(t for t, _ in texts[1:]) == text  # multi-byte characters split over tokens too
    assert not any(special for _, special in texts[1:])


def test_shades_run_from_the_low_scores_to_the_threshold() -> None:
    import json

    scores = [-2.0, -1.0, 0.0, 1.0, 2.0, 5.0]
    fields = {
        "features": json.dumps([{"name": "f", "score": 1.2, "threshold": 2.0, "flagged": False}]),
        "tokens": json.dumps(
            {"token_ids": [1, 2, 3, 4, 5, 6], "roles": [0, 0, 1, 1, 1, 1], "scores": {"f": scores}}
        ),
    }
    sample = parse_sample("1-0", fields)
    heat = heat_map(sample, "f")
    assert heat is not None and heat.threshold == 2.0
    levels = [t.level for t in heat.prompt + heat.response]
    assert levels == sorted(levels) and levels[0] == 0 and levels[-2:] == [10, 10]
    assert [t.over for t in heat.response] == [False, False, True, True]
    assert [t.text for t in heat.prompt] == ["[1]", "[2]"]  # no token texts: the ids
    bad = parse_sample(
        "1-0", {**fields, "tokens": json.dumps({"token_ids": [1], "roles": [0, 1], "scores": {}})}
    )
    assert bad.problem and "roles" in bad.problem and heat_map(bad, "f") is None
