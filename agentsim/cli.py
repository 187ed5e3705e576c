"""The ``agentsim`` command line (typer)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

app = typer.Typer(
    help="agentsim: simulate and drive LLM agent programs on multi-GPU, multi-node vLLM clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Sub-command groups owned by their subpackages; each module defines a typer ``app``.
SUBAPPS = (
    ("calibrate", "agentsim.calibration.cli", "Profiles: show, measure a vLLM engine, fit, check."),
    ("trace", "agentsim.traces.cli", "Traces: import, inspect, export."),
    ("live", "agentsim.live.cli", "Run agent programs on real vLLM engines (Ray cluster or HTTP endpoints)."),
)


def _register_subapps() -> None:
    groups = {g.name for g in app.registered_groups}
    for name, module, help_text in SUBAPPS:
        if name not in groups and importlib.util.find_spec(module) is not None:
            app.add_typer(importlib.import_module(module).app, name=name, help=help_text)
    if "compare" not in {c.name for c in app.registered_commands}:
        from agentsim.live.cli import compare_command

        app.command("compare")(compare_command)


def main() -> None:
    from agentsim.commands import register_commands

    register_commands(app)
    _register_subapps()
    from agentsim.errors import AgentsimError

    try:
        app(standalone_mode=False)
    except AgentsimError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit,) as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            typer.echo("aborted", err=True)
            sys.exit(130)
        raise
