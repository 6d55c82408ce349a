"""Residual-stream activations of chat transcripts, read with transformers.

Hook point, the same one the vLLM tap uses: the residual stream after decoder layer ``L``
(1-based), i.e. the output of ``model.layers[L - 1]``. In vLLM a decoder layer returns
``(hidden, residual)`` with the last add deferred, and ``hidden + residual`` is this tensor; in
transformers it is ``output_hidden_states[L]`` for ``L < num_layers`` (the last entry there has the
final norm applied, our hook does not).

Each record becomes a token sequence rendered by the model's chat template, with every token
marked prompt (0) or response (1). The response span is the assistant's text; the end-of-turn
tokens after it are dropped, since a serving engine never feeds its final stop token back.
Records with a plain ``text`` are one span, marked response.

A real model is read in the dtype it is served in (``ReaderOptions.dtype``): the hook's tensor
is the residual stream as that dtype computes it, widened to float32 exactly, i.e. what the tap
sees in a vLLM serving that dtype (up to kernel differences). ``device_map="auto"`` spreads the
layers over the devices accelerate finds (GPUs, then CPU). ``token_budget`` batches by padded
tokens (rows x longest row) rather than by a record count, so short records go many to a forward
and long ones few, and the peak activation memory is bounded whatever the lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from detectors.decoder_layers import find_decoder_layers, text_num_layers
from detectors.errors import ModelError
from detectors.roles import PROMPT, RESPONSE
from detectors.transcripts import Transcript

Dtype = Literal["bfloat16", "float16", "float32"]
DTYPES: tuple[Dtype, ...] = ("bfloat16", "float16", "float32")


@dataclass(frozen=True, kw_only=True)
class ReaderOptions:
    """How a model is loaded and batched for reading (the offline CLI's ``--device``,
    ``--dtype``, ``--device-map``, ``--token-budget``)."""

    device: str = "cpu"
    dtype: Dtype = "float32"
    device_map: Literal["auto"] | None = None  # "auto": accelerate places the layers; no device
    token_budget: int | None = None  # padded tokens per forward; None: batch_size records

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device_map not in (None, "auto"):
            raise ModelError(f"device_map: expected 'auto' or none, got {self.device_map!r}")
        if self.device_map is not None and self.device != "cpu":
            raise ModelError(
                f"device_map {self.device_map!r} places the model itself; drop device "
                f"{self.device!r}"
            )
        if self.token_budget is not None and self.token_budget < 1:
            raise ModelError(f"token_budget: expected a positive count, got {self.token_budget}")


@dataclass(frozen=True)
class TokenActivations:
    token_ids: np.ndarray  # [t] int64
    roles: np.ndarray  # [t] int8, PROMPT or RESPONSE
    layers: dict[int, np.ndarray]  # layer -> [t, d] float32


class _StopForward(Exception):
    """Raised from the deepest hook we need so later layers are not computed."""


class ActivationReader:
    """Reads residual activations from a Hugging Face causal LM directory (Llama family)."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        model: object | None = None,
        *,
        options: ReaderOptions | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        opts = options or ReaderOptions(device=device)
        self.options = opts
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        dtype = getattr(torch, opts.dtype)
        loaded: Any = model
        if loaded is None:
            extra = {"device_map": opts.device_map} if opts.device_map else {}
            loaded = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, **extra)
        if opts.device_map is None:
            loaded = loaded.to(torch.device(opts.device), dtype=dtype)
        self.model = loaded.eval()
        # Inputs go where the embedding is (under a device map, the first layers' device).
        self.device = self.model.get_input_embeddings().weight.device
        self.decoder_layers = _decoder_layers(self.model)
        self.num_layers = len(self.decoder_layers)
        self.hidden_size = int(self.model.config.hidden_size)

    def check_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.num_layers:
            raise ModelError(
                f"layer {layer} is out of range for {self.model_dir.name}: "
                f"it has {self.num_layers} decoder layers, so a layer is 1..{self.num_layers}"
            )

    def encode(
        self, record: Transcript, max_tokens: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids and roles of one record, response truncated so the total fits ``max_tokens``."""
        tok = self.tokenizer
        if record.text is not None:
            ids = tok(record.text, add_special_tokens=False)["input_ids"]
            roles = [RESPONSE] * len(ids)
        else:
            prompt = template_ids(tok, record.prompt_messages, add_generation_prompt=True)
            full = template_ids(
                tok,
                [*record.prompt_messages, {"role": "assistant", "content": record.response}],
                add_generation_prompt=False,
            )
            if full[: len(prompt)] != prompt:
                raise ModelError(
                    f"{self.model_dir.name}: the chat template does not render the prompt as a "
                    "prefix of the conversation; prompt and response spans cannot be separated"
                )
            tail = tok(record.response, add_special_tokens=False)["input_ids"]
            end = _response_end(full, len(prompt), tail)
            ids = full[:end]
            roles = [PROMPT] * len(prompt) + [RESPONSE] * (end - len(prompt))
        if max_tokens is not None and len(ids) > max_tokens:
            ids, roles = ids[:max_tokens], roles[:max_tokens]
        return list(ids), roles

    def read(
        self,
        records: Sequence[Transcript],
        layers: Sequence[int],
        *,
        max_tokens: int | None = 256,
        batch_size: int = 8,
        progress: bool = True,
        desc: str = "reading activations",
    ) -> Iterator[TokenActivations]:
        """Yield one ``TokenActivations`` per record, in input order."""
        encoded = [self.encode(r, max_tokens) for r in records]
        yield from self.read_encoded(
            encoded, layers, batch_size=batch_size, progress=progress, desc=desc
        )

    def read_encoded(
        self,
        encoded: Sequence[tuple[list[int], list[int]]],
        layers: Sequence[int],
        *,
        batch_size: int = 8,
        progress: bool = True,
        desc: str = "reading activations",
    ) -> Iterator[TokenActivations]:
        import torch
        from tqdm import tqdm

        layers = sorted(set(layers))
        for layer in layers:
            self.check_layer(layer)
        # Length-sorted batches waste little on padding; results are put back in input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        budget = self.options.token_budget
        batches = (
            _budget_batches([len(encoded[i][0]) for i in order], budget)
            if budget is not None
            else [(s, min(s + batch_size, len(order))) for s in range(0, len(order), batch_size)]
        )
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        done: dict[int, TokenActivations] = {}
        next_out = 0
        bar = tqdm(total=len(encoded), desc=desc, disable=not progress, unit="rec")
        for start, end in batches:
            batch = order[start:end]
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            captured = self._forward(ids.to(self.device), mask.to(self.device), layers)
            for row, i in enumerate(batch):
                seq, roles = encoded[i]
                n = len(seq)
                done[i] = TokenActivations(
                    token_ids=np.asarray(seq, dtype=np.int64),
                    roles=np.asarray(roles, dtype=np.int8),
                    layers={lay: captured[lay][row, :n].copy() for lay in layers},
                )
            bar.update(len(batch))
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        bar.close()

    def _forward(self, ids: object, mask: object, layers: list[int]) -> dict[int, np.ndarray]:
        import torch

        captured: dict[int, np.ndarray] = {}
        deepest = max(layers)

        def make_hook(layer: int) -> Any:
            def hook(_module: Any, _args: Any, output: Any) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                captured[layer] = hidden.detach().float().cpu().numpy()
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = [
            self.decoder_layers[lay - 1].register_forward_hook(make_hook(lay)) for lay in layers
        ]
        try:
            with torch.inference_mode():
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured


def _budget_batches(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Spans ``[start, end)`` of ``lengths`` (ascending) whose padded size, rows times the
    longest, stays within ``budget``; a record longer than the budget goes alone."""
    spans, start = [], 0
    for end in range(1, len(lengths) + 1):
        if end - start > 1 and (end - start) * lengths[end - 1] > budget:
            spans.append((start, end - 1))
            start = end - 1
    if start < len(lengths):
        spans.append((start, len(lengths)))
    return spans


def _decoder_layers(model: Any) -> Sequence[Any]:
    layers = find_decoder_layers(model, text_num_layers(model.config))
    if isinstance(layers, str):
        raise ModelError(f"{layers}; cannot find the decoder layers to read")
    return layers


def template_ids(
    tok: object, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    out = tok.apply_chat_template(  # type: ignore[attr-defined]
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _response_end(full: list[int], start: int, tail: list[int]) -> int:
    """Index just past the assistant text in ``full``, dropping the template's end-of-turn tokens."""
    # Tokenising the response alone can split its edges differently from the whole render, so
    # match the longest common prefix and fall back to the render's length minus its suffix.
    n = 0
    while n < len(tail) and start + n < len(full) and full[start + n] == tail[n]:
        n += 1
    if n >= len(tail) - 1:
        return start + max(n, 1)
    return max(start + 1, len(full) - 2)


def mean_pool(acts: TokenActivations, layer: int) -> np.ndarray:
    """Mean over the response tokens (all tokens when a record has none marked response)."""
    x = acts.layers[layer]
    sel = acts.roles == RESPONSE
    return (x[sel] if sel.any() else x).mean(axis=0)
