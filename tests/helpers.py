"""What several test files share: running the CLI in-process and reading its one-line errors."""

from typer.testing import CliRunner

from truthmap.cli import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, exit_code: int = 1) -> str:
    """The command's only output line, after checking its exit code and that no traceback was printed."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1, result.output
    return result.output.rstrip("\n")
