"""The ``misalign-monitor`` command."""

from __future__ import annotations

import logging
import sys

import click

from detectors.cli import calibrate, evaluate, extract, model_group, score
from detectors.errors import MisalignError


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
def demo(model: str | None, bundle_path: str | None) -> None:
    """Score the shipped demo conversations and print a table of scores and flags."""
    from detectors.demo import run_demo

    run_demo(model, bundle_path)


for command in (model_group, extract, calibrate, score, evaluate):
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
