"""Start a job's command and watch its process tree until every process of it is gone.

The command is started with posix_spawn (no `subprocess`, no extra exec) after gpurun pinned
itself to the job's CPUs, so the command is pinned before it runs a line of its own.

Signals: gpurun blocks the signals it forwards and takes them with sigwaitinfo, which also says
who sent each. The command stays in gpurun's process group, so at a terminal it is in the
foreground (the keyboard works) and Ctrl-C reaches it straight from the kernel; gpurun then
does not pass that signal on again (si_code SI_KERNEL), so the command sees it once. Signals
sent to gpurun by a process (kill, a scheduler) are passed on to the command.

gpurun makes itself a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER): processes the job
leaves behind when their parent exits are re-parented to gpurun, not to init, so the whole
tree stays visible and is ended before the lease is freed.
"""

from __future__ import annotations

import os
import sys
import time

from gpurun import liveness, signals
from gpurun.errors import CommandError
from gpurun.log import get_logger

# Only for annotations: importing collections costs a launch 1.4 ms (see record.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

log = get_logger(__name__)

FORWARDED = (
    signals.SIGINT,
    signals.SIGTERM,
    signals.SIGHUP,
    signals.SIGQUIT,
    signals.SIGUSR1,
    signals.SIGUSR2,
)
# Signals that end a waiting gpurun cleanly, leaving nothing in the ledger.
ENDING = (signals.SIGINT, signals.SIGTERM, signals.SIGHUP)
BLOCKED = (*FORWARDED, signals.SIGCHLD)
SI_KERNEL = 0x80


def resolve_command(name: str) -> str:
    """Find the executable as execvp(3) would; raise CommandError with 127 or 126."""
    if "/" in name:
        candidates = [name]
    else:
        path = os.environ.get("PATH", os.defpath)
        candidates = [os.path.join(folder or ".", name) for folder in path.split(os.pathsep)]
    denied = None
    for candidate in candidates:
        if os.path.isdir(candidate):
            denied = denied or candidate
            continue
        if os.access(candidate, os.X_OK):
            return candidate
        if os.path.exists(candidate):
            denied = denied or candidate
    if denied is not None:
        raise CommandError(
            name,
            "permission denied (not an executable file); make it executable (chmod +x) or run "
            "it with its interpreter",
            126,
        )
    raise CommandError(name, "command not found; check the name and PATH", 127)


def exec_argv(executable: str, command: list[str]) -> tuple[str, list[str]]:
    """What to hand posix_spawn for `command`, checked before anything is reserved.

    A script's interpreter must exist (else 127, as a shell says "bad interpreter"). A file
    that is neither a script with #! nor an ELF program is run by /bin/sh, as execvp(3) does;
    posix_spawn would refuse it. Raises CommandError.
    """
    try:
        with open(executable, "rb") as f:
            head = f.read(256)
    except OSError as exc:
        raise CommandError(command[0], f"cannot read it ({exc.strerror})", 126) from None
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        interpreter = os.fsdecode(words[0]) if words else ""
        if not interpreter or not os.access(interpreter, os.X_OK):
            raise CommandError(
                command[0], f"bad interpreter '{interpreter}': not found or not executable", 127
            )
        return executable, command
    if head.startswith(b"\x7fELF"):
        return executable, command
    return "/bin/sh", ["sh", executable, *command[1:]]


def spawn(executable: str, command: list[str], env: dict[str, str], cpus: tuple[int, ...]) -> int:
    """Start the command pinned to `cpus` (all of ours when empty); return its pid.

    Call with BLOCKED signals blocked; the command starts with none blocked.
    """
    # A server's CPUs in the inventory may be bookkeeping this host does not have; pin to the
    # ones it has, and not at all when it has none of them.
    usable = set(cpus) & os.sched_getaffinity(0) if cpus else set()
    if usable:
        os.sched_setaffinity(0, usable)
    _become_subreaper()
    return os.posix_spawn(
        executable,
        command,
        env,
        setsigmask=(),
        setsigdef=(signals.SIGPIPE, signals.SIGXFSZ),
    )


def wait_for_command(
    pid: int,
    deadline: float | None,
    grace: float,
    on_overrun: Callable[[], None] | None = None,
    on_running: tuple[float, Callable[[], None]] | None = None,
) -> int:
    """Pass signals on until the command exits; return its wait status.

    With a `deadline` (time.monotonic()), the job gets SIGTERM then, and SIGKILL `grace`
    seconds later; `on_overrun()` is called once when the deadline passes. With `on_running`
    (a time.monotonic() and a function), the function is called once at that time if the
    command still runs.
    """
    waitset = set(BLOCKED)
    kill_at = None
    running_at, running = on_running if on_running is not None else (None, None)
    while True:
        wake = deadline
        if running_at is not None:
            wake = running_at if deadline is None else min(running_at, deadline)
        if wake is None:
            info = signals.sigwaitinfo(waitset)
        else:
            info = signals.sigtimedwait(waitset, max(0.0, wake - time.monotonic()))
        if info is None and running_at is not None and time.monotonic() >= running_at:
            running_at = None
            running()
        elif info is None and deadline is not None and time.monotonic() >= deadline:
            if kill_at is None:
                if on_overrun is not None:
                    on_overrun()
                signal_tree(signals.SIGTERM)
                kill_at = time.monotonic() + grace
                deadline = kill_at
            else:
                signal_tree(signals.SIGKILL)
                deadline = None
        elif info is not None and info.si_signo == signals.SIGCHLD:
            status = reap_children(pid)
            if status is not None:
                return status
        elif info is not None and info.si_code != SI_KERNEL:
            try:
                os.kill(pid, info.si_signo)
            except ProcessLookupError:
                pass


def reap_children(pid: int) -> int | None:
    """Reap every exited child; return the command's wait status if it was among them."""
    found = None
    while True:
        try:
            child, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if child == 0:
            return found
        if child == pid:
            found = status


def end_leftovers(grace: float) -> None:
    """End what the job left running: SIGTERM, then SIGKILL after `grace` seconds.

    As subreaper, every such process is a descendant of gpurun, so "no children" means the
    job's tree is gone. Waits for processes that ignore even SIGKILL (stuck in the kernel):
    their GPU may still be in use.
    """
    if not _has_children():
        return
    log.info("the command exited; ending what it left: %s", liveness.descendants(os.getpid()))
    signal_tree(signals.SIGTERM)
    deadline = time.monotonic() + grace
    killed = False
    while _has_children():
        left = deadline - time.monotonic()
        if left <= 0 and not killed:
            signal_tree(signals.SIGKILL)
            killed = True
        signals.sigtimedwait({signals.SIGCHLD}, 0.5 if killed else min(left, 0.5))
        reap_children(-1)


def signal_tree(signum: int) -> None:
    """Send `signum` to every process below this one."""
    for pid in liveness.descendants(os.getpid()):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _has_children() -> bool:
    while True:
        try:
            child, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if child == 0:
            return True


def _become_subreaper() -> None:
    from gpurun import libc

    try:
        libc.call("prctl", 36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except OSError:
        log.debug("cannot become a child subreaper; orphans of the job go to init")


def say(message: str) -> None:
    """One line for the user on stderr."""
    sys.stderr.write(f"gpurun: {message}\n")
    sys.stderr.flush()
