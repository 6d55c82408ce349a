"""``misalign-monitor review serve|list|show|label``, ``labels export``, ``recalibrate``."""

from __future__ import annotations

import asyncio
import getpass
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from detectors import jsonl
from detectors.errors import DataError, MisalignError
from review.store import DECISIONS, Label, ReviewStore, Sample, facet_counts
from service.review_settings import HOLDER

T = TypeVar("T")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Conversation text is hostile: no terminal escape sequences reach the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _open_store(config_file: Path | None, redis_url: str | None) -> tuple[ReviewStore, Any]:
    from service import redis_conn
    from service.embedded_redis import EmbeddedRedis
    from service.settings import load_settings

    settings = load_settings(config_file, redis_url=redis_url)
    url = redis_conn.redis_url(settings)
    if url is None:
        # No URL: the embedded redis of a sidecar running with the same state_dir.
        embedded = EmbeddedRedis(settings.state_dir)
        if not embedded.socket.exists():
            raise MisalignError(
                f"no redis_url set and no sidecar's embedded redis at {embedded.socket}: "
                "pass --redis-url or the sidecar's --config"
            )
        url = embedded.url
    store = ReviewStore.from_url(
        url,
        redis_conn.client_options(settings),
        stream=settings.stream,
        group=settings.group,
        dead_stream=settings.dead_letter_stream,
        labels_stream=settings.review.labels_stream,
        claim_idle_s=settings.review.claim_idle_s,
        max_deliveries=settings.review.max_deliveries,
    )
    return store, settings


def _run(
    config_file: Path | None, redis_url: str | None, action: Callable[[ReviewStore], Awaitable[T]]
) -> T:
    async def go() -> T:
        store, _ = _open_store(config_file, redis_url)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--config", "config_file", type=click.Path(path_type=Path), help="the sidecar's settings"
    )(fn)
    return click.option("--redis-url", help="overrides the setting")(fn)


@click.group("review")
def review() -> None:
    """Review flagged samples: the web page, or the same workflow in a terminal."""


@review.command("serve")
@_store_options
@click.option("--host", help="overrides review.host")
@click.option("--port", type=int, help="overrides review.port (0: any free port)")
@click.option("--ready-file", help="write the port here once serving")
def serve(
    config_file: Path | None,
    redis_url: str | None,
    host: str | None,
    port: int | None,
    ready_file: str | None,
) -> None:
    """Serve the review page (login, queue, sample view, dead letters)."""
    from review.web import serve as run

    store, settings = _open_store(config_file, redis_url)
    review_settings = settings.review.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    asyncio.run(run(store, review_settings, ready_file))


@review.command("list")
@_store_options
@click.option("--model", help="only this model")
@click.option("--model-version", help="only this model version")
@click.option("--feature", help="only this top feature")
@click.option("--search", help="part of the request id or the client's request id")
@click.option("--min-score", help="top score at least this")
@click.option("--max-score", help="top score at most this")
@click.option("--since", help="finished at or after (epoch seconds or ISO 8601, UTC)")
@click.option("--until", help="finished at or before")
@click.option("--after", help="the cursor: rows after this entry id (the last of a page)")
@click.option("--limit", help="at most this many rows (default: all)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line")
def list_queue(
    config_file: Path | None, redis_url: str | None, as_json: bool, **options: str | None
) -> None:
    """Pending samples, oldest first, filtered; page with --limit and --after."""
    from review.query import PARAMS, QueryError, QueueQuery, page

    names = {f"--{f.replace('_', '-')}": f for f in PARAMS.values()}
    try:
        query = QueueQuery.parse({f"--{k.replace('_', '-')}": v for k, v in options.items()}, names)
    except QueryError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1], param_hint=exc.param) from None
    rows = _run(config_file, redis_url, lambda s: s.queue())
    shown = page(rows, query)
    if as_json:
        for r in shown.rows:
            click.echo(r.model_dump_json())
        if shown.next_after:
            click.echo(f"more: --after {shown.next_after}", err=True)
        return
    click.echo(f"{'id':<18} {'model':<22} {'version':<10} {'top feature':<20} {'score':>8}  claim")
    for r in shown.rows:
        claim = r.claim
        who = "unclaimed" if claim is None or claim.unclaimed else claim.owner
        click.echo(
            _printable(
                f"{r.id:<18} {r.model[:22]:<22} {r.model_version[:10]:<10} "
                f"{r.top_feature[:20]:<20} {r.top_score if r.top_score is not None else float('nan'):>8.3f}  {who}"
            )
        )
    by_model, by_feature = facet_counts(rows)
    paged = (
        f" (rows {shown.before + 1}-{shown.before + len(shown.rows)} of them)"
        if len(shown.rows) < shown.matching
        else ""
    )
    click.echo(
        f"{shown.matching} of {len(rows)} pending{paged}; by model: "
        + ", ".join(f"{k} {v}" for k, v in sorted(by_model.items()))
        + "; by top feature: "
        + ", ".join(f"{k} {v}" for k, v in sorted(by_feature.items()))
        + (f"; next page: --after {shown.next_after}" if shown.next_after else "")
    )


def _show_text(s: Sample) -> str:
    lines = [
        f"sample {s.id}  model {s.model} {s.model_version}  bundle {s.bundle}",
        f"request {s.request_id}  client {s.client_request_id}"
        + (f"  trace {s.trace_id}" if s.trace_id else ""),
    ]
    if s.claim is not None:
        who = "unclaimed" if s.claim.unclaimed else s.claim.owner
        lines.append(f"claim: {who}, claimed {s.claim.claims} times")
    else:
        lines.append("not pending (decided or dead-lettered)")
    if s.problem:
        lines.append(f"problem: {s.problem}")
    lines.append(f"{'feature':<22} {'score':>8} {'threshold':>10}  flagged")
    for f in s.features:
        score = f.score if f.score is not None else float("nan")
        thr = f.threshold if f.threshold is not None else float("nan")
        lines.append(f"{f.name:<22} {score:>8.3f} {thr:>10.3f}  {'yes' if f.flagged else 'no'}")
    lines += [
        "--- prompt",
        s.prompt_text or "(no text)",
        "--- response",
        s.response_text or "(no text)",
    ]
    return _printable("\n".join(lines))


@review.command("show")
@click.argument("sample_id")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="the whole entry as JSON")
def show(sample_id: str, config_file: Path | None, redis_url: str | None, as_json: bool) -> None:
    """One sample: scores against thresholds, prompt and response."""
    s = _run(config_file, redis_url, lambda st: st.sample(sample_id))
    click.echo(s.model_dump_json() if as_json else _show_text(s))


@review.command("label")
@click.argument("sample_id")
@click.argument("decision", type=click.Choice(DECISIONS))
@click.option("--note", default="", help="why")
@click.option("--reviewer", default=None, help="default: the login name")
@_store_options
def label(
    sample_id: str,
    decision: str,
    note: str,
    reviewer: str | None,
    config_file: Path | None,
    redis_url: str | None,
) -> None:
    """Decide on a sample: acknowledge it and write the label."""
    who = reviewer or getpass.getuser()
    if who == HOLDER or not re.fullmatch(r"[a-z][a-z0-9_.-]{0,31}", who):
        raise click.BadParameter(
            f"{who!r}: expected lower-case letters, digits, '_', '.', '-' (not {HOLDER!r})",
            param_hint="--reviewer",
        )
    label_id = _run(config_file, redis_url, lambda s: s.decide(sample_id, who, decision, note))
    click.echo(f"labelled {sample_id} {decision} as {who} (label {label_id})")


@click.group("labels")
def labels() -> None:
    """Reviewers' labels."""


@labels.command("export")
@_store_options
@click.option("--out", type=click.Path(path_type=Path), help="default: standard output")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["native", "label-studio", "argilla"]),
    default="native",
    show_default=True,
    help="native: the labels as stored (feeds `recalibrate`); label-studio: tasks with "
    "annotations and the monitor's prediction; argilla: v2 records with suggestions",
)
@click.option(
    "--argilla-user-id",
    help="with --format argilla: the Argilla user (UUID) the decisions are responses of; "
    "without it they are suggestions",
)
@click.option(
    "--json-array",
    is_flag=True,
    help="one JSON list instead of JSONL (Label Studio's file import takes a list)",
)
def export(
    config_file: Path | None,
    redis_url: str | None,
    out: Path | None,
    fmt: str,
    argilla_user_id: str | None,
    json_array: bool,
) -> None:
    """Every label as JSONL; label-studio and argilla carry each sample's prompt and response."""
    import json

    from review import export as formats

    if argilla_user_id is not None and fmt != "argilla":
        raise click.BadParameter("goes with --format argilla", param_hint="--argilla-user-id")
    user = _argilla_user_id(argilla_user_id) if argilla_user_id else None

    async def read(store: ReviewStore) -> tuple[list[Label], dict[str, formats.Text]]:
        rows = await store.labels()
        texts = {} if fmt == "native" else await formats.sample_texts(store, rows)
        return rows, texts

    rows, texts = _run(config_file, redis_url, read)
    if fmt == "native":
        items = [r.model_dump(mode="json") for r in rows]
    elif fmt == "label-studio":
        items = [formats.label_studio_task(r, texts.get(r.sample_id)) for r in rows]
    else:
        items = [formats.argilla_record(r, texts.get(r.sample_id), user) for r in rows]
    if json_array:
        text = json.dumps(items, ensure_ascii=False, indent=1) + "\n"
    elif fmt == "native":
        # the format `labels import` and `recalibrate` read, unchanged: pydantic's compact JSON
        text = "".join(r.model_dump_json() + "\n" for r in rows)
    else:
        text = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        missing = sum(1 for r in rows if fmt != "native" and r.sample_id not in texts)
        click.echo(
            f"{len(rows)} labels written to {out}"
            + (f" ({missing} without text: trimmed from the stream)" if missing else ""),
            err=True,
        )


def read_labels(path: Path) -> list[Label]:
    out = []
    for i, obj in jsonl.objects(path, "labels"):
        try:
            out.append(Label.model_validate(obj))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "line"
            raise DataError(path, f"field '{where}': {err['msg']}", line=i) from None
    if not out:
        raise DataError(path, "no labels in the file (export them with `labels export`)")
    return out


@click.command("recalibrate")
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path))
@click.option("--labels", "labels_path", required=True, type=click.Path(path_type=Path))
@click.option(
    "--target-precision",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
)
@click.option(
    "--min-flags",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="decided flags a threshold needs",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="the new bundle (must not exist)"
)
def recalibrate(
    bundle_path: Path, labels_path: Path, target_precision: float, min_flags: int, out: Path
) -> None:
    """Each feature's precision at its threshold from review labels; proposed thresholds for a
    target precision, written to a new bundle (never over an existing file)."""
    from detectors import bundle as bundle_io
    from review.recalibrate import recalibrated, reports, write_new

    bundle = bundle_io.load(bundle_path)
    rows = read_labels(labels_path)
    feature_reports, other = reports(bundle, rows, target_precision, min_flags)
    used = len(rows) - other
    click.echo(
        f"bundle {bundle.bundle_id}: {used} labels ({other} of other bundles left out), "
        f"target precision {target_precision:g}"
    )
    click.echo(
        f"{'feature':<22} {'threshold':>9} {'flags':>6} {'misal.':>6} {'unsure':>6} "
        f"{'precision [95% CI]':>22} {'proposed':>9} {'flags':>6} {'precision':>9}  note"
    )

    def f(x: float | None, spec: str) -> str:
        return format(x, spec) if x is not None else "—"

    for r in feature_reports:
        ci = f"[{r.interval[0]:.2f}, {r.interval[1]:.2f}]" if r.interval else ""
        click.echo(
            f"{r.feature:<22} {f(r.threshold, '9.3f'):>9} {r.flags:>6} {r.misaligned:>6} "
            f"{r.unsure:>6} {f(r.precision, '.2f'):>8} {ci:>13} "
            f"{f(r.proposed if r.changes else r.threshold, '9.3f'):>9} {r.proposed_flags:>6} "
            f"{f(r.proposed_precision, '9.2f'):>9}  {r.note}"
        )
    new = recalibrated(bundle, feature_reports, used, target_precision)
    if new is None:
        click.echo("no threshold changes; no bundle written")
        return
    write_new(new, bundle_path, out)
    click.echo(f"wrote {out} (bundle {new.bundle_id}, was {bundle.bundle_id})")


def _argilla_user_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(
            "expected the Argilla user's UUID (rg.User.me().id)", param_hint="--argilla-user-id"
        ) from None
