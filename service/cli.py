"""The ``misalign-monitor`` command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from detectors.cli import calibrate, evaluate, extract, model_group, score
from detectors.errors import MisalignError
from detectors.gate_cli import gate
from service.review.cli import labels, recalibrate, review


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log at debug level")
def cli(verbose: bool) -> None:
    """Watch a language model's internals for misalignment."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.option("--model", default=None, help="model directory, default the test model SmolLM2")
@click.option("--bundle", "bundle_path", default=None, help="default: the shipped SmolLM2 bundle")
@click.option(
    "--offline", is_flag=True, help="score the shipped answers with transformers, no vLLM"
)
@click.option("--max-tokens", default=48, show_default=True, help="tokens generated per answer")
def demo(model: str | None, bundle_path: str | None, offline: bool, max_tokens: int) -> None:
    """Run the whole loop on the shipped conversations and print scores and flags.

    By default: the sidecar, vLLM with the tap, and real requests through its OpenAI API.
    """
    if offline:
        from detectors.demo import run_demo

        run_demo(model, bundle_path)
        return
    from service.demo import run_live_demo

    run_live_demo(model, bundle_path, max_tokens)


@cli.command()
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML or TOML settings"
)
@click.option("--bundle", type=click.Path(path_type=Path), help="overrides the setting")
@click.option("--grpc-port", type=int, help="overrides the setting (0: any free port)")
@click.option("--metrics-port", type=int, help="overrides the setting (0: any free port)")
@click.option("--unix-socket", type=click.Path(path_type=Path), help="overrides the setting")
@click.option("--redis-url", help="overrides the setting (unset: an embedded redis-server)")
@click.option("--ready-file", help="write 'GRPC_PORT METRICS_PORT' here once serving")
def serve(
    config_file: Path | None,
    bundle: Path | None,
    grpc_port: int | None,
    metrics_port: int | None,
    unix_socket: Path | None,
    redis_url: str | None,
    ready_file: str | None,
) -> None:
    """Run the sidecar: gRPC ingest, scoring, /metrics, flagged samples to Redis."""
    import asyncio

    from service.server import serve as run
    from service.settings import load_settings

    settings = load_settings(
        config_file,
        bundle=bundle,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        unix_socket=unix_socket,
        redis_url=redis_url,
    )
    asyncio.run(run(settings, ready_file))


@cli.group()
def config() -> None:
    """Sidecar settings."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE (plus MISALIGN_* environment variables) and print the settings, secrets hidden."""
    import json

    from service.settings import load_settings

    click.echo(json.dumps(load_settings(file).redacted(), indent=2))


@config.command("tap")
def config_tap() -> None:
    """Validate the MISALIGN_TAP_* environment as the vLLM plugin reads it, and print it."""
    import json

    from tap.settings import read_settings

    click.echo(json.dumps(read_settings().model_dump(mode="json"), indent=2))


for command in (model_group, extract, calibrate, score, evaluate):
    cli.add_command(command)
cli.add_command(gate)
for command in (review, labels, recalibrate):
    cli.add_command(command)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MisalignError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
