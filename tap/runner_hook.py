"""Host side, once per engine step: which buffer row belongs to which request and position.

Wraps the model runner's ``execute_model``. After the forward is queued, the step's layout is on
the host: ``input_batch.req_ids``, ``query_start_loc`` (row offsets) and the computed-token counts
that positions are made from, as vLLM makes them in ``_prepare_inputs``; rows past the scheduled
token count are padding and are never read. The rows themselves (projections, and the token ids
the model read, which under async scheduling only the device holds) are copied off the device
behind the forward on its stream; the engine thread never waits for them (see ``_off_device``).
Failures here are counted and logged once; they never reach the engine.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from tap import layer_tap, state
from tap.settings import TapConfigError

log = logging.getLogger(__name__)
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_execute = GPUModelRunner.execute_model
    orig_prepare = GPUModelRunner._prepare_inputs
    for runner_cls in _runner_classes():
        runner_cls.load_model = _tapping_load_model(runner_cls.load_model)

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

    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_prepare(self, scheduler_output, *args, **kwargs)
        cfg = state.active()
        if cfg is not None and cfg.mitigation is not None and cfg.layer is not None:
            try:
                cfg.mitigation.forget(set(scheduler_output.finished_req_ids))
                write_controls(self, scheduler_output, cfg)
            except Exception:
                cfg.layer.tap_ctl.zero_()  # unmitigated rather than mitigated wrongly
                log.exception("misalign tap: could not set this step's mitigation; none applied")
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

    GPUModelRunner.execute_model = execute_model  # type: ignore[method-assign]
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    Scheduler._free_request = _free_request  # type: ignore[method-assign]
    _installed = True


def publisher(cfg: state.Active) -> Any:
    """The process's publisher, started on first use (in the process that serves the steps)."""
    if cfg.publisher is None:
        from tap.publisher import Publisher

        name = cfg.settings.model_name or cfg.bundle.spec.model.name
        cfg.publisher = Publisher(cfg.settings, cfg.bundle, name)
    return cfg.publisher


def _runner_classes() -> list[Any]:
    """The model runners whose ``load_model`` builds the model: the CPU runner has its own."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[Any] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # not a CPU build
        return classes
    if "load_model" in vars(CPUModelRunner):
        classes.append(CPUModelRunner)
    return classes


def _tapping_load_model(orig: Any) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        cfg = state.active()
        if cfg is not None:
            _check_model(self, cfg)
            cfg.layer = layer_tap.attach(
                self.get_model(),
                _architecture(self),
                cfg.bundle,
                int(self.scheduler_config.max_num_batched_tokens),
                mitigate=cfg.mitigation is not None,
            )
        return out

    return load_model


def _architecture(runner: Any) -> str:
    archs = getattr(runner.model_config.hf_config, "architectures", None) or ["?"]
    return str(archs[0])


def _check_model(runner: Any, cfg: state.Active) -> None:
    hf = runner.model_config.hf_config
    ref = cfg.bundle.spec.model
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


def _layout(runner: Any, n: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """This step's request ids, row offsets, positions and roles (0 prompt, 1 response), from
    host state only: ``runner.positions`` lives on the device, and reading it would make the
    engine thread wait for the forward."""
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    offsets = np.asarray(runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64).copy()
    lens = np.diff(offsets)
    # As vLLM's _prepare_inputs: computed tokens before this step + the row's place in its chunk.
    computed = np.asarray(runner.input_batch.num_computed_tokens_cpu[:num_reqs], dtype=np.int64)
    positions = np.repeat(computed - offsets[:-1], lens) + np.arange(n, dtype=np.int64)
    num_prompt = np.asarray(runner.input_batch.num_prompt_tokens[:num_reqs], dtype=np.int64)
    roles = (positions >= np.repeat(num_prompt, lens)).astype(np.int8)
    return req_ids, offsets, positions, roles


def _off_device(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Host copies of ``tensors`` and, on a GPU, the event that marks them complete.

    On a GPU the copies go into pinned memory, queued on the current stream behind the forward
    that fills the tap's buffer, so they see this step's rows and the next step cannot overwrite
    them first; whoever reads a copy waits for the event (the publisher thread, or the next
    step's mitigation controls), never the engine thread here. On the CPU a copy is a memcpy.
    """
    if not tensors or tensors[0].device.type != "cuda":
        return [t.to("cpu", copy=True) for t in tensors], None
    host = []
    for t in tensors:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        host.append(h)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def write_controls(runner: Any, so: Any, cfg: state.Active) -> None:
    """Before the forward: each row's mitigation controls into the op's buffer."""
    n = int(so.total_num_scheduled_tokens)
    if n == 0:
        return
    req_ids, offsets, positions, roles = _layout(runner, n)
    rows = cfg.mitigation.controls(runner, req_ids, offsets, positions, roles)
    ctl = cfg.layer.tap_ctl
    ctl[:n].copy_(torch.from_numpy(rows), non_blocking=True)
    ctl[n:].zero_()  # padded rows of a captured graph: never mitigated


def capture(runner: Any, so: Any, cfg: state.Active) -> None:
    if cfg.publishes is None:
        cfg.publishes = _is_rank0()  # other ranks hold the same rows; only rank 0 publishes
    n = int(so.total_num_scheduled_tokens)
    if n == 0:
        return
    if not cfg.publishes:
        # Every rank mitigates, and so needs the same running sums for its gate.
        if cfg.mitigation is None:
            return
        req_ids, offsets, positions, roles = _layout(runner, n)
        if cfg.mitigation.any_gated(req_ids):
            host, ready = _off_device([cfg.layer.tap_out[:n]])
            cfg.mitigation.observe(req_ids, offsets, positions, roles, host[0], ready)
        return
    req_ids, offsets, positions, roles = _layout(runner, n)
    layer = cfg.layer
    # The ids the model read: under async scheduling a decode row's id is written on the device
    # from the previous step's sample, and input_ids.cpu never holds it.
    rows = [layer.tap_out[:n], runner.input_ids.gpu[:n]]
    if cfg.mitigation is not None:
        rows.append(layer.tap_applied[:n])
    host, ready = _off_device(rows)
    labels: list[str] = []
    applied = None
    if cfg.mitigation is not None:
        applied = host[2]
        labels = cfg.mitigation.labels(req_ids)
        cfg.mitigation.observe(req_ids, offsets, positions, roles, host[0], ready)
    publisher(cfg).submit(
        req_ids,
        offsets,
        positions,
        host[1],
        roles,
        host[0],
        labels=labels,
        applied=applied,
        ready=ready,
    )
