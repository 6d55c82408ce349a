"""The sidecar's commands: ``serve`` and ``config``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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


@click.group()
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
