"""`python -m services.platform`: all four services in one process, one gRPC address.

Writes the bound address to $TUNEFORGE_READY_FILE once serving (port 0 picks a free port). An address
that is taken ends the process with `EXIT_ADDRESS_IN_USE` and one line on stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.kit.runtime import configure_logging, run_until_stopped, serve, tune_interpreter
from services.platform.components import all_components
from tuneforge_core.settings import KitSettings


def main() -> None:
    settings = KitSettings()
    configure_logging(settings.log_level)
    tune_interpreter(settings)
    ready_file = os.environ.get("TUNEFORGE_READY_FILE")

    def on_ready(address: str) -> None:
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(address)
            tmp.replace(ready_file)

    run_until_stopped(serve(all_components(), settings, name="tuneforge", on_ready=on_ready,
                            freeze_heap=True, end_stuck_shutdown=True))


if __name__ == "__main__":
    main()
