"""The platform as `tuneforge up` runs it, private to the fuzz tests (they cancel jobs and delete datasets,
which the seeded session platform of tests/platform must keep), seeded so every id field has a real value
to point at."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.platform.conftest import Seeded, seed_platform


@pytest.fixture(scope="module")
def fuzz_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    yield from seed_platform(tmp_path_factory.mktemp("fuzz-platform"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many calls the hostile-input test made, per RPC and in all, when it ran."""
    module = sys.modules.get("tests.fuzz.test_hostile_input")
    if module is not None and module.CALLS:
        terminalreporter.write_sep("-", "hostile input")
        terminalreporter.write_line(module.calls_line())
