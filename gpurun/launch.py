"""Run one job: reserve its lease, start the command pinned to it, supervise, free it.

The launch path runs thousands of times in sweeps, so it imports only the standard modules it
needs and starts the command with posix_spawn (no `subprocess`, no extra exec).

Signals: gpurun blocks the signals it forwards and takes them with sigwaitinfo, which also
says who sent each. The command stays in gpurun's process group, so at a terminal it is in the
foreground (the keyboard works) and Ctrl-C reaches it straight from the kernel; gpurun then
does not pass that signal on again (si_code SI_KERNEL), so the command sees it once. Signals
sent to gpurun by a process (kill, a scheduler) are passed on to the command.

gpurun makes itself a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER): processes the job
leaves behind when their parent exits are re-parented to gpurun, not to init, so the whole
tree stays visible and is ended before the lease is freed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from gpurun import liveness
from gpurun.config import Config
from gpurun.cpulist import format_cpulist
from gpurun.errors import BusyError, CommandError, GpurunError, Interrupted, LedgerError
from gpurun.ledger import Holder, Lease, Ledger, State
from gpurun.log import get_logger
from gpurun.placement import Request, check_possible, place

log = get_logger(__name__)

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Signals that end a waiting gpurun cleanly (no lease is left behind).
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SI_KERNEL = 0x80
POLL_SECONDS = 1.0


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
        raise CommandError(name, "permission denied (not an executable file)", 126)
    raise CommandError(name, "command not found; check the name and PATH", 127)


def run_job(
    config: Config,
    request: Request,
    command: list[str],
    name: str | None = None,
    wait: bool = True,
    timeout: float | None = None,
) -> int:
    """Reserve, run and free one job; return the exit status gpurun should exit with."""
    executable = resolve_command(command[0])
    check_possible(request, config.gpus, config.cpus)
    ledger = Ledger(config.state_dir, config.server, config.lock_timeout)
    ledger.ensure_dirs()

    lease, lock_fd = reserve(ledger, config, request, command, name, wait, timeout)
    return supervise(ledger, config, lease, lock_fd, executable, command)


def reap_dead(ledger: Ledger, state: State, now: float) -> list[Lease]:
    """Drop the dead leases from `state` (under the lock) and return them."""
    dead = [
        lease
        for lease in state.leases
        if not liveness.lease_alive(lease, ledger.job_lock_path(lease.id), now)
    ]
    for lease in dead:
        state.remove(lease.id)
        log.info("reaped dead lease %d (%s)", lease.id, lease.name)
    return dead


def forget_dead(ledger: Ledger, dead: list[Lease], now: float) -> None:
    """After the reaping transaction: record the dead jobs in history, remove their locks."""
    ledger.append_history(
        [finished_record(lease, ledger.server, now, None, "dead") for lease in dead]
    )
    for lease in dead:
        _unlink(ledger.job_lock_path(lease.id))


def held_ids(leases: list[Lease]) -> tuple[set[int], set[int]]:
    gpus: set[int] = set()
    cpus: set[int] = set()
    for lease in leases:
        gpus.update(lease.gpus)
        cpus.update(lease.cpus)
    return gpus, cpus


def reserve(
    ledger: Ledger,
    config: Config,
    request: Request,
    command: list[str],
    name: str | None,
    wait: bool,
    timeout: float | None,
) -> tuple[Lease, int]:
    """Record a lease for the request, waiting until it fits; return it and its job lock.

    Returns with the forwarded signals blocked, so none is lost before the command starts.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    watcher = None
    me = os.getpid()
    my_start = liveness.process_start(me)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in ENDING[1:]}
    blocked = (*FORWARDED, signal.SIGCHLD)
    try:
        while True:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            now = time.time()
            lease = None
            lock_fd = -1
            try:
                with ledger.transaction() as state:
                    dead = reap_dead(ledger, state, now)
                    held_gpus, held_cpus = held_ids(state.leases)
                    spot = place(request, config.gpus, config.cpus, held_gpus, held_cpus)
                    if spot is not None:
                        lease_id = state.take_id()
                        lock_fd = _lock_job(ledger, lease_id)
                        lease = Lease(
                            id=lease_id,
                            kind="job",
                            state="running",
                            name=name or os.path.basename(command[0]),
                            user=_user_name(),
                            uid=os.getuid(),
                            host=os.uname().nodename,
                            gpus=spot[0],
                            cpus=spot[1],
                            command=tuple(command),
                            created=now,
                            started=None,
                            holders=(Holder(me, my_start, "gpurun"),),
                            boot=liveness.boot_id(),
                            expires=None,
                        )
                        state.add(lease)
                    else:
                        busy = describe_busy(request, config, state.leases)
            except BaseException:
                if lock_fd >= 0:
                    os.close(lock_fd)
                    _unlink(ledger.job_lock_path(lease.id if lease else lease_id))
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
                raise
            forget_dead(ledger, dead, now)
            if lease is not None:
                if announced:
                    _say(f"job {lease.id} starting after waiting")
                return lease, lock_fd
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)

            if not wait:
                raise BusyError(f"{busy}; not waiting (--no-wait)")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise BusyError(f"{busy}; gave up after --timeout {timeout:g} s")
            if not announced:
                _say(f"waiting: {busy}")
                announced = True
            if watcher is None:
                watcher = _Watcher(ledger.state_dir)
            watcher.wait(POLL_SECONDS if left is None else min(left, POLL_SECONDS))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if watcher is not None:
            watcher.close()


def describe_busy(request: Request, config: Config, leases: list[Lease]) -> str:
    """One phrase: what the request waits for and which jobs hold it."""
    held_gpus, held_cpus = held_ids(leases)
    holders = ", ".join(f"{lease.id} ({lease.user}, {lease.name})" for lease in leases[:6])
    if len(leases) > 6:
        holders += f" and {len(leases) - 6} more"
    want = (
        f"{request.gpus} GPUs"
        if request.gpu_ids is None
        else f"GPUs {','.join(map(str, request.gpu_ids))}"
    )
    return (
        f"needs {want} and {request.cpus} CPUs; {len(held_gpus)} of {len(config.gpus)} "
        f"GPUs and {len(held_cpus)} of {len(config.cpus)} CPUs are held by jobs {holders}"
    )


def job_env(lease: Lease) -> dict[str, str]:
    env = dict(os.environ)
    ids = ",".join(map(str, lease.gpus))
    env["CUDA_VISIBLE_DEVICES"] = ids
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["GPURUN_JOB_ID"] = str(lease.id)
    env["GPURUN_GPUS"] = ids
    env["GPURUN_CPUS"] = format_cpulist(lease.cpus)
    if lease.cpus and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(len(lease.cpus))
    return env


def supervise(
    ledger: Ledger,
    config: Config,
    lease: Lease,
    lock_fd: int,
    executable: str,
    command: list[str],
) -> int:
    """Start the command in the lease, pass signals on, wait for its whole tree, free the lease.

    Called with the forwarded signals and SIGCHLD blocked.
    """
    waitset = {*FORWARDED, signal.SIGCHLD}
    pending = signal.sigpending() & set(ENDING)
    if pending:
        signum = min(pending)
        _release(ledger, lease, lock_fd, None)
        raise Interrupted(signum)

    try:
        if lease.cpus:
            os.sched_setaffinity(0, lease.cpus)
        _become_subreaper()
        pid = os.posix_spawn(
            executable,
            command,
            job_env(lease),
            setsigmask=(),
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as exc:
        _release(ledger, lease, lock_fd, None)
        if isinstance(exc, PermissionError) or exc.errno in (8, 13):
            raise CommandError(command[0], f"cannot run it ({exc.strerror})", 126) from None
        if isinstance(exc, FileNotFoundError):
            raise CommandError(command[0], "command not found", 127) from None
        raise GpurunError(
            f"cannot start {command[0]} on CPUs {format_cpulist(lease.cpus)}: {exc.strerror}"
        ) from None
    started = time.time()
    lease = _record_command(ledger, lease, pid, started)

    status = _wait_for_command(pid, waitset)
    _end_leftovers(config.kill_grace)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        name = signal.Signals(-code).name
        _say(f"job {lease.id} ({lease.name}) was ended by {name}")
        code = 128 - code
    _release(ledger, lease, lock_fd, code, started)
    return code


def _wait_for_command(pid: int, waitset: set[int]) -> int:
    """Pass signals on until the command exits; return its wait status."""
    while True:
        info = signal.sigwaitinfo(waitset)
        if info.si_signo == signal.SIGCHLD:
            status = _reap_children(pid)
            if status is not None:
                return status
        elif info.si_code != SI_KERNEL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def _reap_children(pid: int) -> int | None:
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


def _end_leftovers(grace: float) -> None:
    """End what the job left running: SIGTERM, then SIGKILL after `grace` seconds.

    As subreaper, every such process is a descendant of gpurun, so "no children" means the
    job's tree is gone.
    """
    if not _has_children():
        return
    targets = liveness.descendants(os.getpid())
    log.info("the command exited; ending %d processes it left: %s", len(targets), targets)
    _signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _has_children():
        left = deadline - time.monotonic()
        if left <= 0:
            _signal_all(liveness.descendants(os.getpid()), signal.SIGKILL)
            deadline = time.monotonic() + 3600
            continue
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))
        _reap_children(-1)


def _has_children() -> bool:
    try:
        child, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return False
    if child:
        return _has_children()
    return True


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _record_command(ledger: Ledger, lease: Lease, pid: int, started: float) -> Lease:
    """Add the command's pid and start time to the lease; the job lock covers a failure."""
    start = liveness.process_start(pid)
    if start is None:
        return lease
    updated = lease._replace(
        holders=(*lease.holders, Holder(pid, start, "command")), started=started
    )
    try:
        with ledger.transaction() as state:
            if state.find(lease.id) is not None:
                state.replace(updated)
    except LedgerError as exc:
        log.warning(
            "could not record the command's pid in the ledger (%s); the job lock "
            "still keeps the lease",
            exc,
        )
    return updated


def _release(
    ledger: Ledger, lease: Lease, lock_fd: int, code: int | None, started: float | None = None
) -> None:
    """Remove the lease, append the job to history (if it ran) and drop the job lock."""
    now = time.time()
    try:
        with ledger.transaction() as state:
            state.remove(lease.id)
    except LedgerError as exc:
        log.warning(
            "could not remove lease %d (%s); the next gpurun or 'gpurun gc' will reap it",
            lease.id,
            exc,
        )
    if code is not None:
        done = lease._replace(started=started or lease.started)
        ledger.append_history([finished_record(done, ledger.server, now, code, "exited")])
    os.close(lock_fd)
    _unlink(ledger.job_lock_path(lease.id))


def finished_record(
    lease: Lease, server: str, ended: float, code: int | None, state: str
) -> dict[str, object]:
    """The history line for a job that ended (`code` None when it was reaped dead)."""
    record = lease.to_json()
    del record["holders"], record["boot"], record["expires"]
    command = [h.pid for h in lease.holders if h.role == "command"]
    gpurun = [h.pid for h in lease.holders if h.role == "gpurun"]
    record.update(
        server=server,
        state=state,
        exit_code=code,
        ended=ended,
        pid=(command or gpurun or [None])[0],
        duration=None if lease.started is None else round(ended - lease.started, 3),
    )
    return record


def _lock_job(ledger: Ledger, lease_id: int) -> int:
    try:
        return liveness.lock_job(ledger.job_lock_path(lease_id))
    except OSError as exc:
        raise LedgerError(
            ledger.job_lock_path(lease_id), f"cannot create the job lock: {exc.strerror}"
        ) from None


def _become_subreaper() -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        log.debug("cannot become a child subreaper; orphans of the job go to init")


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _say(message: str) -> None:
    sys.stderr.write(f"gpurun: {message}\n")
    sys.stderr.flush()


class _Watcher:
    """Wakes a waiting gpurun when a ledger in the state dir is replaced (inotify(7)).

    Without inotify it simply sleeps; the poll interval bounds the wait either way, which
    also catches leases whose processes died without anyone rewriting the ledger.
    """

    IN_MOVED_TO = 0x80

    def __init__(self, folder: str) -> None:
        self.fd = -1
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0 and libc.inotify_add_watch(fd, folder.encode(), self.IN_MOVED_TO) >= 0:
                self.fd = fd
            elif fd >= 0:
                os.close(fd)
        except (OSError, AttributeError):
            self.fd = -1

    def wait(self, seconds: float) -> None:
        if self.fd < 0:
            time.sleep(seconds)
            return
        import select

        ready, _, _ = select.select([self.fd], [], [], seconds)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.fd, 65536)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
