"""The ``agentsim`` command line (typer).

:func:`main` is the console entry point; it keeps every command's outcome as the process's exit
status (the convention of click-based CLIs and of ``vllm``):

====  =====================================================================================
0     success
1     the command ran and failed: ``calibrate check --max-median-error`` exceeded, an
      incomplete or interrupted live run (``typer.Exit(1)`` raised by the command), a file
      operation that failed where no check caught it first (one line naming the file)
2     bad input: a usage error (unknown command or option, a value of the wrong type: the usage
      line and the error, no traceback) or an :class:`~agentsim.errors.AgentsimError` (one line
      naming the field, FILE:LINE or output path)
130   interrupted (Ctrl-C / SIGINT: 128 + signal 2, as shells report it)
====  =====================================================================================

typer >= 0.26 vendors its own click (``typer._click``) and no longer installs click, so the
exceptions are taken from typer's public API (``typer.TyperException``, ``typer.Abort``,
``typer.Exit``); on older typer, which re-exports click's classes, the usage-error base class
is found from ``typer.BadParameter``'s ancestry. click itself is never imported.
"""

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

#: exit status of an interrupted command (SIGINT)
EXIT_INTERRUPTED = 130
#: exit status of bad input (usage errors, config/trace/output-path errors)
EXIT_USAGE = 2


def _usage_error_base() -> type[BaseException]:
    """typer's base class of usage errors (``TyperException`` >= 0.26; click's ``ClickException`` before)."""
    base = getattr(typer, "TyperException", None)
    if base is not None:
        return base
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")  # pragma: no cover


def _version(value: bool) -> None:
    if value:
        from agentsim import __version__

        typer.echo(f"agentsim {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print agentsim's version and exit."),
) -> None:
    """agentsim: simulate and drive LLM agent programs on multi-GPU, multi-node vLLM clusters."""


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
    if "study" not in {c.name for c in app.registered_commands}:
        from agentsim.experiments.study_cli import register as register_study

        register_study(app)
    if "report" not in {c.name for c in app.registered_commands}:
        from agentsim.report import report_command

        app.command("report")(report_command)
    if "pd-bench" not in {c.name for c in app.registered_commands}:
        from agentsim.live.pd_cli import pd_bench_command

        app.command("pd-bench")(pd_bench_command)


def _register() -> None:
    """Add the commands and sub-apps once (``run_cli`` may be called many times in one process)."""
    from agentsim.commands import register_commands

    if "simulate" not in {c.name or getattr(c.callback, "__name__", "") for c in app.registered_commands}:
        register_commands(app)
    _register_subapps()


def _show_usage_error(e: BaseException) -> None:
    show = getattr(e, "show", None)
    if callable(show):
        show()  # the usage line, a hint and "Error: ..." on stderr (click's format)
    else:
        typer.echo(f"Error: {getattr(e, 'message', e)}", err=True)


def run_cli(args: list[str] | None = None) -> int:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return the exit status (table above)."""
    from agentsim.errors import AgentsimError

    usage_error = _usage_error_base()
    try:
        _register()
        rv = app(args=args, prog_name="agentsim", standalone_mode=False)
    except AgentsimError as e:
        typer.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    except OSError as e:
        # a file operation that failed where no check caught it first (the commands check their
        # paths before any work): one line naming the file(s), and exit 1 -- the command ran and
        # failed; it is not known to be bad input
        if e.filename is None:
            raise
        files = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        typer.echo(f"error: {files}: {e.strerror or e}", err=True)
        return 1
    except typer.Exit as e:  # raised outside typer's own handling (e.g. from an eager callback)
        return int(e.exit_code or 0)
    except usage_error as e:
        _show_usage_error(e)
        code = getattr(e, "exit_code", EXIT_USAGE)
        # a usage error is bad input: exit 2 even where a typer version reports 1
        return EXIT_USAGE if code in (1, 2) and _is_usage(e) else int(code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside a command (imports, registration)
        typer.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    # In non-standalone mode typer returns a command's typer.Exit code (KeyboardInterrupt inside a
    # command becomes Exit(130)); a command that returns normally gives None.
    if isinstance(rv, int) and not isinstance(rv, bool):
        if rv == EXIT_INTERRUPTED:
            typer.echo("interrupted", err=True)
        return rv
    return 0


def _is_usage(e: BaseException) -> bool:
    return any(c.__name__ == "UsageError" for c in type(e).__mro__)


def main() -> None:
    """Console entry point: ``sys.exit`` with :func:`run_cli`'s status."""
    sys.exit(run_cli())
