"""Host side, once per engine step: which buffer row belongs to which request and position.

Wraps the model runner's ``execute_model``. After the forward, the step's layout is on the host:
``input_batch.req_ids``, ``query_start_loc`` (row offsets), ``positions`` and ``input_ids``; rows
past the scheduled token count are padding and are never read. Failures here are counted and
logged once; they never reach the engine.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tap import state
from tap.settings import TapConfigError

log = logging.getLogger(__name__)
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_execute = GPUModelRunner.execute_model
    orig_load = GPUModelRunner.load_model

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_load(self, *args, **kwargs)
        cfg = state.active()
        if cfg is not None:
            _check_model(self, cfg)
        return out

    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_execute(self, scheduler_output, *args, **kwargs)
        cfg = state.active()
        if cfg is not None and cfg.layer is not None:
            try:
                capture(self, scheduler_output, cfg)
            except Exception:
                publisher(cfg).count_drop(scheduler_output.total_num_scheduled_tokens, "tap_error")
                log.exception("misalign tap: could not read this step; counted as dropped")
        return out

    from vllm.v1.core.sched.scheduler import Scheduler

    orig_free = Scheduler._free_request

    def _free_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = state.active()
        if cfg is not None:
            try:
                publisher(cfg).finish(request.request_id, str(getattr(request, "status", "")))
            except Exception:
                log.exception("misalign tap: could not report a finished request")
        return orig_free(self, request, *args, **kwargs)

    GPUModelRunner.load_model = load_model  # type: ignore[method-assign]
    GPUModelRunner.execute_model = execute_model  # type: ignore[method-assign]
    Scheduler._free_request = _free_request  # type: ignore[method-assign]
    _installed = True


def publisher(cfg: state.Active) -> Any:
    """The process's publisher, started on first use (in the process that serves the steps)."""
    if cfg.publisher is None:
        from tap.publisher import Publisher

        name = cfg.settings.model_name or cfg.bundle.spec.model.name
        cfg.publisher = Publisher(cfg.settings, cfg.bundle, name)
    return cfg.publisher


def _check_model(runner: Any, cfg: state.Active) -> None:
    hf = runner.model_config.hf_config
    ref = cfg.bundle.spec.model
    if cfg.layer is None:
        raise TapConfigError(
            f"misalign tap: the model's architecture {getattr(hf, 'architectures', ['?'])} is not "
            f"one the tap supports ({', '.join(('LlamaForCausalLM',))}); refusing to serve unmonitored"
        )
    if hf.hidden_size != ref.hidden_size or hf.num_hidden_layers != ref.num_layers:
        raise TapConfigError(
            f"misalign tap: bundle {cfg.bundle.path} is for {ref.name} (hidden size "
            f"{ref.hidden_size}, {ref.num_layers} layers) but the model has hidden size "
            f"{hf.hidden_size} and {hf.num_hidden_layers} layers"
        )


def _is_rank0() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()) == 0
    except Exception:
        return True


def capture(runner: Any, so: Any, cfg: state.Active) -> None:
    if cfg.publisher is None and not _is_rank0():
        cfg.layer = None  # other ranks hold the same rows; only rank 0 publishes
        return
    n = int(so.total_num_scheduled_tokens)
    if n == 0:
        return
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    offsets = np.asarray(runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64).copy()
    positions = runner.positions[:n].to("cpu").numpy().astype(np.int64)
    token_ids = np.asarray(runner.input_ids.cpu[:n].numpy(), dtype=np.int64).copy()
    num_prompt = np.asarray(runner.input_batch.num_prompt_tokens[:num_reqs], dtype=np.int64)
    roles = (positions >= np.repeat(num_prompt, np.diff(offsets))).astype(np.int8)
    proj = cfg.layer.tap_out[:n].to("cpu", copy=True).numpy()
    publisher(cfg).submit(req_ids, offsets, positions, token_ids, roles, proj)
