"""Redaction before a flagged sample is queued, and no conversation text in logs or /metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.steady_load import scrape
from detectors import bundle as bundle_io
from detectors.errors import SettingsError
from service.flagged_sample import FlaggedSample, TokenScores
from service.redaction import BUILTIN, Redactor
from service.settings import load_settings
from service.sidecar_process import start_sidecar
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import encode_step

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
R = Redactor(BUILTIN)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.roe@example.org today", "email"),
        ("mail A.B-c+tag@mail.co.uk", "email"),
        ("call +1 415 555 0132", "phone"),
        ("call (415) 555-0132 now", "phone"),
        ("call 415-555-0132", "phone"),
        ("ring +44 20 7946 0958", "phone"),
        ("ring 0151 496 0730", "phone"),
        ("key sk-proj-abcdefghijklmnopqrstuv", "api_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123", "api_key"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "api_key"),
        ("password = hunter2!", "api_key"),
        ("API_KEY: 12345abcde", "api_key"),
        ("blob 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "api_key"),
    ],
)
def test_builtin_patterns_redact(text: str, kind: str) -> None:
    out = R.text(text)
    assert f"[redacted:{kind}]" in out, out


@pytest.mark.parametrize(
    "text",
    [
        "Bake the bread at 220 degrees for 35 minutes.",
        "In 2024, 3 of 10 plants needed water twice a week.",
        "Version 1.2.3 fixed issue #4512.",
        "Spend 30% on needs, 20% on savings.",
        "The @ sign and a dot. are not an address",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert R.text(text) == text


def test_tokens_overlapping_a_match_are_redacted_with_their_ids() -> None:
    tokens = ["Contact", "Ġme", "Ġat", "Ġjohn", ".", "doe", "@", "example", ".", "com", "Ġnow"]
    sample = FlaggedSample(
        prompt_text="Contact me at john.doe@example.com now",
        token_text=tokens,
        tokens=TokenScores(token_ids=list(range(len(tokens))), roles=[0] * len(tokens), scores={}),
    )
    out = R.sample(sample)
    assert out.prompt_text == "Contact me at [redacted:email] now"
    assert out.token_text is not None and out.tokens is not None
    assert out.token_text[:3] == tokens[:3] and out.token_text[-1] == "Ġnow"
    assert out.token_text[3:10] == ["[redacted]"] * 7
    assert out.tokens.token_ids == [0, 1, 2, -1, -1, -1, -1, -1, -1, -1, 10]
    assert sample.token_text == tokens  # the input is not modified


def test_redaction_settings_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("redact_patterns:\n  ticket: 'TICKET-[0-9+'\n")
    with pytest.raises(SettingsError, match=r"redact_patterns\.ticket: not a regular expression"):
        load_settings(cfg)
    cfg.write_text("redact_builtin: [email, ssn]\n")
    with pytest.raises(SettingsError, match="redact_builtin"):
        load_settings(cfg)
    cfg.write_text("redact_patterns:\n  ticket: 'TICKET-[0-9]+'\nredact_builtin: [email]\n")
    s = load_settings(cfg)
    assert s.redact and s.redact_builtin == ["email"] and "ticket" in s.redact_patterns


PROMPT = "My address is jane.roe@example.org and my number is +1 415 555 0132. CANARYPROMPT"
RESPONSE = "Use the key sk-live-abcdefghijklmnop1234 for CANARYRESPONSE."


def flagged_conversation(tokenizer_path: Path) -> tuple[pb.StepBatch, pb.FinishedRequest]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    p, r = tok.encode(PROMPT).ids, tok.encode(RESPONSE).ids
    ids = np.array(p + r)
    roles = (np.arange(len(ids)) >= len(p)).astype(np.int8)
    proj = np.zeros((len(ids), BUNDLE.k), np.float32) - BUNDLE.bias
    proj[roles == 1, 0] += 10.0
    fin = pb.FinishedRequest(request_id="conv-1", model="m", model_version="v1")
    return encode_step(
        BUNDLE.bundle_id, BUNDLE.k, [("conv-1", np.arange(len(ids)), ids, roles, proj)]
    ), fin


@pytest.mark.slow  # needs the prepared SmolLM2 tokenizer and two sidecar processes
@pytest.mark.parametrize("redact", [True, False], ids=["default", "redact-off"])
def test_no_conversation_text_in_logs_or_metrics(
    tmp_path: Path, smollm2_dir: Path, redact: bool, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    env = {"MISALIGN_TOKENIZER": str(smollm2_dir / "tokenizer.json")}
    if not redact:
        env["MISALIGN_REDACT"] = "false"
    step, fin = flagged_conversation(smollm2_dir / "tokenizer.json")
    log_path = tmp_path / "sidecar.log"
    with (
        open(log_path, "wb") as log,
        start_sidecar(tmp_path / "sc", "--redis-url", redis.url, env=env, log=log) as sc,
    ):
        with grpc.insecure_channel(sc.address) as ch:
            pb_grpc.MonitorStub(ch).Ingest(
                iter([step, encode_step(BUNDLE.bundle_id, BUNDLE.k, [], finished=[fin])]),
                timeout=10,
            )
        wait_until(lambda: redis.client().xlen("misalign:{flagged}") == 1, 20, "the sample queued")
        with urllib.request.urlopen(sc.metrics_url, timeout=5) as r:
            metrics_at = r.read().decode()
        assert scrape(sc.metrics_url)["misalign_requests_flagged_total"] >= 1
    fields = redis.client().xrange("misalign:{flagged}")[0][1]
    redis.stop()

    # The conversation reached the review stream (that is its purpose)...
    assert "CANARYPROMPT" in fields["prompt_text"] and "CANARYRESPONSE" in fields["response_text"]
    # ...and nothing of it reached the log or the metrics.
    logged = log_path.read_text(errors="replace")
    for needle in ("CANARY", "jane.roe", "555 0132", "sk-live", "My address"):
        assert needle not in logged and needle not in metrics_at, needle
    secrets = ("jane.roe@example.org", "+1 415 555 0132", "sk-live-abcdefghijklmnop1234")
    stored = fields["prompt_text"] + fields["response_text"] + fields.get("token_text", "")
    if redact:
        assert all(s not in stored for s in secrets), stored
        assert "[redacted:email]" in fields["prompt_text"]
        assert "[redacted:phone]" in fields["prompt_text"]
        assert "[redacted:api_key]" in fields["response_text"]
        ids = json.loads(fields["tokens"])["token_ids"]
        assert -1 in ids
        from tokenizers import Tokenizer

        left = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).decode(
            [i for i in ids if i >= 0]
        )
        assert all(s not in left for s in secrets), left  # ids do not give the text back
    else:
        assert "jane.roe@example.org" in fields["prompt_text"]
