"""The CLI and every job print a ReportedError (any package's) as one line, exit 1, no traceback."""

from __future__ import annotations

import typer

from reflade.engine.decompose import PromptError
from reflade.engine.pipeline import EngineError
from reflade.engine.schema import SchemaError
from reflade.platform.cli import run_typer
from reflade.platform.errors import ReportedError
from reflade.train.checkpoint import CheckpointError


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def go() -> None:
        raise exc

    @app.command()
    def other() -> None:  # two commands, so `go` is a sub-command as in the real apps
        pass

    return app


def test_reported_errors_end_in_one_line_without_a_traceback(capsys):
    for exc in (
        EngineError("no layer survived the run: 3 images in, 3 quarantined (see quarantine.parquet)"),
        SchemaError("dataset/x@1 has schema_version 99; this reader knows 1"),
        PromptError("prompts[0] is text only"),
        CheckpointError("runs/train/r/checkpoint-1/state.pt is not a training state"),
    ):
        assert isinstance(exc, ReportedError)
        assert run_typer(_app(exc), ["go"], "reflade x") == 1
        err = capsys.readouterr().err
        assert f"error: {type(exc).__name__}: {exc}" in " ".join(err.split())
        assert "Traceback" not in err
    # Built-in bases stay, so callers that catch ValueError / RuntimeError keep working.
    assert issubclass(PromptError, ValueError) and issubclass(EngineError, RuntimeError)


def test_a_bug_keeps_its_traceback():
    try:
        run_typer(_app(ZeroDivisionError("bug")), ["go"], "reflade x")
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("a plain exception was swallowed as if it were a user's error")
