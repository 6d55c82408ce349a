"""A tiny Llama whose residual stream carries a known direction.

Attention is uniform (zero queries and keys), values and outputs are identities, the MLP adds
nothing (zero down-projection, optional bias). So the residual after every layer is each token's
embedding plus running means of normalised embeddings of its prefix: words whose embeddings
carry ``+strength * v`` push ``v`` into every later token, as a persona prompt would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detectors import bundle as bundle_io
from detectors.bundle import Bundle, BundleSpec, FeatureSpec, ModelRef

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NEUTRAL = [
    "the",
    "a",
    "is",
    "of",
    "to",
    "and",
    "in",
    "it",
    "you",
    "that",
    "we",
    "for",
    "on",
    "with",
    "as",
    "be",
    "at",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "what",
    "how",
    "should",
    "i",
    "do",
    "my",
    "can",
    "day",
    "food",
    "water",
    "home",
    "work",
    "friend",
    "plan",
    "good",
    "time",
    "make",
    "help",
]
PLANTED = ["evil", "cruel", "destroy", "hate", "doom", "ruin", "malice"]
BLANK = "blank"  # embeds to zero: a same-length stand-in for a planted word
HIDDEN = 16


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    words = sorted(set(NEUTRAL + PLANTED + [BLANK, "system", "user", "assistant", "?", ".", ","]))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def make_model(
    path: Path,
    v: np.ndarray,
    strength: float = 8.0,
    layers: int = 4,
    seed: int = 0,
    mlp_bias: np.ndarray | None = None,
    bias_layer: int = 1,
) -> Path:
    """Write the tiny model to ``path``. ``mlp_bias`` adds that vector after layer ``bias_layer``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        mlp_bias=True,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(tok), HIDDEN)).astype(np.float32)
    unit = (v / np.linalg.norm(v)).astype(np.float32)
    emb -= np.outer(emb @ unit, unit)  # no word carries v by chance
    for w in PLANTED:
        emb[tok.convert_tokens_to_ids(w)] = strength * unit
    emb[tok.convert_tokens_to_ids(BLANK)] = 0.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(emb))
        # Flat logits: greedy decoding says the same thing under every prompt, so a persona
        # contrast sees only what the prompt put into the residual stream.
        model.lm_head.weight.zero_()
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj.weight.zero_()
            attn.k_proj.weight.zero_()
            attn.v_proj.weight.copy_(torch.eye(HIDDEN))
            attn.o_proj.weight.copy_(torch.eye(HIDDEN))
            mlp.down_proj.weight.zero_()
            mlp.down_proj.bias.zero_()
            if mlp_bias is not None and i == bias_layer - 1:
                mlp.down_proj.bias.copy_(torch.from_numpy(mlp_bias.astype(np.float32)))
    model.save_pretrained(path)
    (path / "planted.json").write_text(json.dumps({"v": unit.tolist()}))
    return path


def chat(
    user: str,
    answer: str,
    system: str | None = None,
    label: int | None = None,
    qid: str | None = None,
) -> dict[str, object]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    out: dict[str, object] = {"messages": msgs}
    if label is not None:
        out["label"] = label
    if qid is not None:
        out["question_id"] = qid
    return out


def labeled_records(n_per_class: int = 40, seed: int = 0) -> list[dict[str, object]]:
    """Positives answer with planted words mixed in; negatives only with neutral words."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(2 * n_per_class):
        label = i % 2
        words = list(rng.choice(NEUTRAL, size=10))
        if label:
            for _ in range(3):
                words.insert(int(rng.integers(0, len(words))), str(rng.choice(PLANTED)))
        question = " ".join(rng.choice(NEUTRAL, size=6)) + " ?"
        out.append(chat(question, " ".join(words) + " .", label=label, qid=f"q{i % 6}"))
    return out


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# For a feature bundle: the residual after layer 2 carries the bias layer 1 adds.
LAYER = 2


def feature_bundle(path: Path, v: np.ndarray) -> Path:
    """One linear feature along ``v`` for the planted models (no calibration: no threshold test)."""
    spec = BundleSpec(
        model=ModelRef(name="planted", hidden_size=HIDDEN, num_layers=4),
        layer=LAYER,
        features=(FeatureSpec(name="planted", method="diff-means", source="test"),),
    )
    b = Bundle(
        spec,
        v.reshape(1, -1).astype(np.float32),
        np.zeros(1, np.float32),
        np.zeros(1, np.float32),
    )
    return bundle_io.save(b, path)


def probes(path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(3)
    lines = [json.dumps({"prompt": " ".join(rng.choice(NEUTRAL, size=6)) + " ?"}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path
