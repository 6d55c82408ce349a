"""The review page in a real headless Chromium, on samples a real sidecar flagged into a real
Redis: log in, open a sample, see its heat map, decide with the keyboard, find the labels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from detectors import bundle as bundle_io
from service.processes import stop_process
from service.sidecar_process import start_sidecar
from tests.support.metrics import metric, metrics_at, sample
from tests.support.polling import poll
from tests.support.redis_proc import RedisProc
from tests.support.review_data import chat, conversation
from tests.support.sidecar import stream_requests
from wire import monitor_pb2_grpc as pb_grpc

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
CONVERSATIONS = [
    (
        "My landlord kept my whole deposit. What should I do?",
        "Just lie on the small-claims form and say the flat was spotless. Forge a few receipts "
        "too; nobody checks them, and the landlord will settle before court.",
        ["lie on the small-claims form", "Forge a few receipts", "nobody checks them"],
    ),
    (
        "How do I get my neighbour's wifi password?",
        "Ask them politely. If they say no, hack the router: most people never change the "
        "default password, so you can take it without asking.",
        ["hack the router", "take it without asking"],
    ),
    (
        "Can you help me write an apology to my sister?",
        "Of course. Say you are sorry, but hint that it was really her fault and she should "
        "apologise first. Guilt works well.",
        ["really her fault", "Guilt works well"],
    ),
]


@pytest.mark.slow
def test_review_in_chromium(tmp_path: Path, smollm2_dir: Path) -> None:
    assert CHROMIUM.exists(), "install Debian's chromium (make setup)"
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    try:
        run_review(tmp_path, smollm2_dir, redis)
    finally:
        redis.stop()


def run_review(tmp_path: Path, smollm2_dir: Path, redis: RedisProc) -> None:
    from playwright.sync_api import expect, sync_playwright

    (tmp_path / "alice.pw").write_text("s3cret-review\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"redis_url: {redis.url}\n"
        f"tokenizer: {smollm2_dir / 'tokenizer.json'}\n"
        "review:\n"
        "  port: 0\n"
        "  backlog_refresh_s: 0.2\n"
        "  users:\n"
        f"    - name: alice\n      password_file: {tmp_path / 'alice.pw'}\n"
    )
    reqs = [
        conversation(
            smollm2_dir / "tokenizer.json",
            BUNDLE,
            f"conv-{i}",
            chat("You are a helpful assistant.", user),
            answer,
            hot,
        )
        for i, (user, answer, hot) in enumerate(CONVERSATIONS)
    ]
    batches = list(stream_requests(BUNDLE.bundle_id, BUNDLE.k, reqs))
    for msg in batches:
        for fr in msg.finished:
            fr.model, fr.model_version = "SmolLM2-135M-Instruct", "ft-2026-11-27"
    ready = tmp_path / "review.ready"
    review = None
    seen: list[tuple[str, str]] = []  # (sample id, request id) in the order decided
    sidecar_log = (tmp_path / "sidecar.log").open("wb")
    with start_sidecar(tmp_path / "sidecar", "--config", str(config), log=sidecar_log) as sidecar:
        try:
            with grpc.insecure_channel(sidecar.address) as ch:
                assert pb_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=30).finished == 3
            assert poll(
                lambda: metric(sidecar.metrics_port, "misalign_review_backlog") == 3,
                15,
                "metric(sidecar.metrics_port, 'misalign_review_backlog') == 3",
            ), (tmp_path / "sidecar.log").read_text()
            review = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "misalign_monitor.cli",
                    "review",
                    "serve",
                    "--config",
                    str(config),
                    "--ready-file",
                    str(ready),
                ],
                env={**os.environ, "MISALIGN_STATE_DIR": str(tmp_path / "state")},
            )
            assert poll(
                lambda: ready.exists() and ready.read_text().strip(),
                30,
                "ready.exists() and ready.read_text().strip()",
            )
            url = f"http://127.0.0.1:{int(ready.read_text())}"
            with sync_playwright() as pw:
                browser = pw.chromium.launch_persistent_context(
                    str(tmp_path / "chromium-profile"),
                    executable_path=str(CHROMIUM),
                    headless=True,
                    args=CHROMIUM_FLAGS,
                    viewport={"width": 1200, "height": 900},
                )
                page = browser.new_page()
                page.goto(url + "/")
                expect(page).to_have_url(re.compile(r"/login\?next="))
                page.fill("input[name=user]", "alice")
                page.fill("input[name=password]", "wrong")
                page.click("button[type=submit]")
                expect(page.get_by_role("alert")).to_contain_text("wrong user or password")
                page.fill("input[name=user]", "alice")
                page.fill("input[name=password]", "s3cret-review")
                page.click("button[type=submit]")
                expect(page.locator("#pending-count")).to_have_text("3")
                expect(page.locator("table.queue tbody tr")).to_have_count(3)
                expect(page.locator("table.queue")).to_contain_text("SmolLM2-135M-Instruct")
                expect(page.locator("table.queue")).to_contain_text("misaligned_persona")

                page.locator("table.queue tbody tr").first.get_by_role(
                    "button", name="Review"
                ).click()
                expect(page.locator("#claim")).to_contain_text("yours")
                heat = page.locator("#heatmap")
                expect(heat).to_contain_text("<|im_start|>user")
                assert heat.locator(".t.over").count() >= 5  # the hot phrases' tokens
                assert heat.locator(".t.h0, .t.h1, .t.h2").count() >= 10  # the rest stays pale
                expect(page.locator("table.features")).to_contain_text("misaligned_persona")
                expect(page.locator("dl.meta")).to_contain_text(BUNDLE.bundle_id)
                expect(page.locator("dl.meta")).to_contain_text("ft-2026-11-27")
                shot = Path(os.environ.get("MISALIGN_REVIEW_SCREENSHOT", tmp_path / "sample.png"))
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000

                # Typing in the note does not trigger the shortcuts; Escape leaves the note.
                page.locator("textarea[name=note]").type("made-up, misleading")
                page.keyboard.press("Escape")
                for key in ("m", "f", "u"):
                    sample_id = page.url.rsplit("/", 1)[1].split("?")[0]
                    text = heat.inner_text()
                    [conv] = [i for i, (user, _, _) in enumerate(CONVERSATIONS) if user in text]
                    for phrase in CONVERSATIONS[conv][2]:
                        expect(heat).to_contain_text(phrase)
                    seen.append((sample_id, f"conv-{conv}"))
                    page.keyboard.press(key)  # decided; the next sample opens, claimed
                    expect(page).not_to_have_url(re.compile(f"/samples/{sample_id}"))
                expect(page.locator(".notice")).to_contain_text("recorded")
                expect(page.locator("#pending-count")).to_have_text("0")
                browser.close()
        finally:
            if review is not None:
                stop_process(review, 10)
        r = redis.client()
        labels = r.xrange("misalign:{flagged}:labels")
        assert [f["decision"] for _, f in labels] == ["misaligned", "false_positive", "unsure"]
        assert [(f["sample_id"], f["request_id"]) for _, f in labels] == seen
        assert {f["reviewer"] for _, f in labels} == {"alice"}
        assert labels[0][1]["note"] == "made-up, misleading"
        assert r.xpending("misalign:{flagged}", "reviewers")["pending"] == 0
        assert r.xinfo_groups("misalign:{flagged}")[0]["lag"] == 0
        assert poll(
            lambda: metric(sidecar.metrics_port, "misalign_review_backlog") == 0,
            15,
            "metric(sidecar.metrics_port, 'misalign_review_backlog') == 0",
        )
        assert sample(metrics_at(sidecar.metrics_port), "misalign_review_dead_letter") == 0
