"""The console script. It guards start-up itself, before any of gpurun's imports run."""

from __future__ import annotations

import os
import sys

# The commands that only read the ledger and print. They build several objects per lease,
# none of them in a cycle, and end right after printing: on 1,000 leases, the cyclic garbage
# collector's passes over them cost them 3 ms, and free nothing.
VIEWS = ("ps", "status")


def _stop_collector() -> None:
    import gc

    gc.disable()


def main() -> None:
    # A closed stdin, stdout or stderr would be reused by the next file gpurun opens (the
    # ledger, say) and then written to by mistake; point them at /dev/null instead.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    # Python sets sys.stdin/stdout/stderr to None for descriptors closed at its start.
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    try:
        from gpurun.cli import main as run
        from gpurun.cli import split_command

        if split_command(sys.argv[1:])[0] in VIEWS:
            _stop_collector()
        code = run()
    except KeyboardInterrupt:
        try:
            sys.stderr.write("gpurun: interrupted while starting; nothing was reserved\n")
        except (OSError, ValueError):
            pass
        code = 130
    sys.exit(code)
