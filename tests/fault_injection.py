"""Run `lavcap ...` with a fault injected: `python tests/fault_injection.py FAULT lavcap-arguments...`, also as the
script of `accelerate launch`.

FAULT is one of
- `exit:RANK:BATCHES`: process RANK (`$RANK`, 0 without a launcher) exits at once, status `EXIT_STATUS`, no clean-up
  (`os._exit`), right after appending its BATCHES-th batch of records (counted over every pass of the run), as a
  process killed by the system would;
- `hold:FILE`: each process waits, when it is about to caption its second batch, until FILE exists, so that a test can
  act while the run is under way (the process writes `FILE.held` when it starts waiting).

`exit` is put into `lavcap_hf.captioning.sharded_run.append_records`, the one function through which a run writes its records;
`hold` into the model's `generate`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

EXIT_STATUS = 75


def inject(fault: str) -> None:
    kind, _, detail = fault.partition(":")
    if kind == "exit":
        rank, batches = (int(value) for value in detail.split(":"))
        exit_after_batches(rank, batches)
    elif kind == "hold":
        hold_second_batch(Path(detail))
    else:
        raise ValueError(f"unknown fault {fault!r}")


def exit_after_batches(rank: int, batches: int) -> None:
    from lavcap_hf.captioning import sharded_run

    append = sharded_run.append_records
    appended = 0

    def append_then_exit(stream, records) -> None:
        nonlocal appended
        append(stream, records)
        appended += 1
        if int(os.environ.get("RANK", "0")) == rank and appended == batches:
            os._exit(EXIT_STATUS)

    sharded_run.append_records = append_then_exit


def hold_second_batch(release: Path) -> None:
    from lavcap_hf import LavCapForConditionalGeneration

    generate = LavCapForConditionalGeneration.generate
    calls = 0

    def wait_then_generate(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            release.with_name(release.name + ".held").write_text(str(os.getpid()))
            while not release.exists():
                time.sleep(0.05)
        return generate(self, *args, **kwargs)

    LavCapForConditionalGeneration.generate = wait_then_generate


if __name__ == "__main__":
    inject(sys.argv[1])
    from lavcap_cli import main

    sys.argv = ["lavcap", *sys.argv[2:]]
    sys.exit(main())
