"""Run `lavcap ...` with a fault injected: `python tests/fault_injection.py FAULT lavcap-arguments...`, also as the
script of `accelerate launch`.

FAULT is one of
- `exit:RANK:BATCHES`: process RANK (`$RANK`, 0 without a launcher) exits at once, status `EXIT_STATUS`, no clean-up
  (`os._exit`), right after appending its BATCHES-th batch of records (counted over every pass of the run), as a
  process killed by the system would;
- `hold:FILE`: after appending its first batch, every process waits until FILE exists, so that a test can act while
  the run is under way (the run writes `FILE.held` when it starts waiting).

The fault is put into `lavcap_hf.sharded_run.append_records`, the one function through which a run writes its records.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

EXIT_STATUS = 75


def inject(fault: str) -> None:
    from lavcap_hf import sharded_run

    append = sharded_run.append_records
    kind, _, detail = fault.partition(":")
    appended = 0

    def append_then_fail(stream, records) -> None:
        nonlocal appended
        append(stream, records)
        appended += 1
        if kind == "exit":
            rank, batches = (int(value) for value in detail.split(":"))
            if int(os.environ.get("RANK", "0")) == rank and appended == batches:
                os._exit(EXIT_STATUS)
        elif kind == "hold" and appended == 1:
            Path(detail + ".held").write_text(str(os.getpid()))
            while not Path(detail).exists():
                time.sleep(0.05)

    sharded_run.append_records = append_then_fail


if __name__ == "__main__":
    inject(sys.argv[1])
    from lavcap_cli import main

    sys.argv = ["lavcap", *sys.argv[2:]]
    sys.exit(main())
