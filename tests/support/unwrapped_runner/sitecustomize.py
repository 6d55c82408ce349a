"""Test-only: a vLLM process in which the tap's model-runner wrappers do not run.

Put this folder first on PYTHONPATH and set MISALIGN_TEST_UNWRAP to ``load_model`` or
``execute_model``: right after the tap installs its wrappers, that method of vLLM's V1 and V2
model runners is put back as vLLM wrote it, as if the engine ran a runner the tap does not wrap.
The worker-level wrappers (the start check and the self-check) stay: they are what the tests of
tests/tap/test_vllm_tap.py examine.
"""

from __future__ import annotations

import os

_METHOD = os.environ.get("MISALIGN_TEST_UNWRAP")

if _METHOD:
    from tap import runner_hook

    _install = runner_hook.install

    def _install_then_unwrap() -> None:
        _install()
        from vllm.v1.worker import cpu_model_runner, gpu_model_runner
        from vllm.v1.worker.gpu import model_runner as v2

        for cls in (
            gpu_model_runner.GPUModelRunner,
            cpu_model_runner.CPUModelRunner,
            v2.GPUModelRunner,
        ):
            method = vars(cls).get(_METHOD)
            if method is not None and hasattr(method, "__wrapped__"):
                setattr(cls, _METHOD, method.__wrapped__)

    runner_hook.install = _install_then_unwrap
