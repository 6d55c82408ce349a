"""The ``misalign-monitor`` command: the one entry point. Its commands live in
``misalign_monitor/commands/``, one module per part of the product."""

from __future__ import annotations

import logging
import sys

import click

from detectors.errors import MisalignError
from misalign_monitor.commands.gate import gate
from misalign_monitor.commands.offline import calibrate, evaluate, extract, model_group, score
from misalign_monitor.commands.review import labels, recalibrate, review
from misalign_monitor.commands.sidecar import config, serve


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
        from misalign_monitor.demo import run_offline_demo

        run_offline_demo(model, bundle_path)
        return
    from misalign_monitor.demo import run_live_demo

    run_live_demo(model, bundle_path, max_tokens)


for command in (serve, config, model_group, extract, calibrate, score, evaluate, gate):
    cli.add_command(command)
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
