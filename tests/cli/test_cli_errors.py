"""What the CLI says when the platform cannot be reached: the gRPC error, then what to do about it."""

from __future__ import annotations

from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()


def test_an_address_where_nothing_answers_says_how_to_start_the_platform() -> None:
    result = runner.invoke(app, ["jobs", "list", "--address", "127.0.0.1:1"],
                           env={"TUNEFORGE_API_KEY": "tf_x", "COLUMNS": "200",
                                "TUNEFORGE_DATA_DIR": "/nonexistent"})
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "UNAVAILABLE" in said, said
    assert "nothing answers at 127.0.0.1:1: start the platform (`tuneforge up`)" in said, said
