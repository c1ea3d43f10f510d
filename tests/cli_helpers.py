"""Running the CLI in-process and asserting the shape of a user error."""

from __future__ import annotations

from klotski.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `klotski ARGV` run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits itself
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code, err: str, *words: str) -> str:
    """Exit code 2, exactly one `klotski: error:` line holding every word, no traceback; the line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("klotski: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
