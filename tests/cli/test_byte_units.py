"""Every size the CLI prints is in binary units (KiB, MiB): the progress bars of `jobs download` and
`datasets upload` too, so the bar and the summary line under it agree (rich's own columns print kB)."""

from __future__ import annotations

from io import StringIO

from rich.console import Console
from rich.progress import Progress

from services.cli.render import BytesColumn, SpeedColumn, size_text


def test_size_text_uses_binary_units() -> None:
    assert size_text(0) == "0 B"
    assert size_text(1023) == "1023 B"
    assert size_text(1536) == "1.5 KiB"
    assert size_text(5 * 1024**3) == "5.0 GiB"
    assert size_text(3 * 1024**4) == "3.0 TiB"


def test_progress_columns_print_binary_units() -> None:
    out = StringIO()
    console = Console(file=out, width=120, color_system=None, force_terminal=False)
    with Progress(BytesColumn(), SpeedColumn(), console=console, auto_refresh=False) as bar:
        task = bar.add_task("x", total=3 * 1024 * 1024)
        bar.update(task, completed=1536 * 1024)
        bytes_text = BytesColumn().render(bar.tasks[0]).plain
        speed = SpeedColumn()
        bar.tasks[0].finished_speed = 2048.0
        speed_text = speed.render(bar.tasks[0]).plain
    assert bytes_text == "1.5/3.0 MiB"
    assert speed_text == "2.0 KiB/s"
    assert "kB" not in bytes_text + speed_text and "MB" not in bytes_text
