"""The console script. It guards start-up itself, before any of gpurun's imports run."""

from __future__ import annotations

import gc
import os
import sys

# The commands that only read the ledger and print. They build several objects per lease,
# none of them in a cycle, and end right after printing: on 1,000 leases, the cyclic garbage
# collector's passes over them cost them 3 ms, and free nothing.
VIEWS = ("ps", "status")


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
            gc.disable()
        code = run()
    except KeyboardInterrupt:
        try:
            sys.stderr.write("gpurun: interrupted while starting; nothing was reserved\n")
        except (OSError, ValueError):
            pass
        code = 130
    _exit(code)


def _exit(code: int) -> None:
    """Exit with `code` without the interpreter's teardown of every module and object.

    The teardown takes about 3 ms, a quarter of the bare interpreter's start on a 2-CPU
    machine (measured: see bench/), and gpurun leaves nothing that needs it: the kernel drops
    its locks and descriptors, it registers no atexit hooks, and its only thread (the Slurm
    backend's stderr relay) is a daemon. The buffered streams are flushed here instead.
    """
    threading = sys.modules.get("threading")
    if threading is not None and any(
        not t.daemon and t is not threading.main_thread() for t in threading.enumerate()
    ):
        sys.exit(code)  # a thread that is not a daemon: Python waits for it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            code = code or 141  # as cli.main answers a closed pipe
        except (OSError, ValueError):
            code = code or 120  # as the interpreter answers a failed flush at exit
    os._exit(code)
