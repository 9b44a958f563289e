"""Signal numbers, names and calls for gpurun, without `import signal`.

The signal module is the C module `_signal` plus enums for its numbers and handlers, and
importing enum costs about 4 ms, a third of the bare interpreter's start on a 2-CPU machine
(measured with `python -X importtime` and wall time; see bench/). gpurun uses the C module's
functions as they are, with plain int numbers, and keeps its own table of names.
"""

from __future__ import annotations

import _signal
from _signal import (  # noqa: F401 - re-exported for the modules that send and take signals
    ITIMER_REAL,
    NSIG,
    SIG_BLOCK,
    SIG_DFL,
    SIG_IGN,
    SIG_UNBLOCK,
    SIGALRM,
    SIGCHLD,
    SIGCONT,
    SIGHUP,
    SIGINT,
    SIGKILL,
    SIGPIPE,
    SIGQUIT,
    SIGSTOP,
    SIGTERM,
    SIGUSR1,
    SIGUSR2,
    SIGXFSZ,
    getsignal,
    pthread_sigmask,
    setitimer,
    signal,
    sigpending,
    sigtimedwait,
    sigwaitinfo,
)

# Every signal name this platform has, with aliases (SIGIOT is SIGABRT).
NUMBERS = {
    key: value
    for key, value in vars(_signal).items()
    if key.startswith("SIG") and not key.startswith("SIG_") and isinstance(value, int)
}
# One name per number: of aliases, the first in alphabetical order, as signal.Signals does.
NAMES = {value: key for key, value in sorted(NUMBERS.items(), reverse=True)}


def name(number: int) -> str:
    """ "SIGTERM" for 15; "signal N" for a number with no name (a real-time signal)."""
    return NAMES.get(number, f"signal {number}")
