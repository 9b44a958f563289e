"""Run one job: queue it, wait for its turn, reserve, start it, free the lease when it ends.

The launch path runs thousands of times in sweeps, so it imports only the standard modules it
needs. A job that fits at once is placed in the same ledger write that queues it: one
transaction to place it, one to record the command's pid if it still runs after RECORD_AFTER,
one to free it.
"""

from __future__ import annotations

import os
import sys
import time

from gpurun import liveness, signals, supervise
from gpurun.admission import BLOCKED, FAILED, READY, admit, queue_order
from gpurun.config import Config
from gpurun.cpulist import format_cpulist
from gpurun.errors import (
    BusyError,
    CommandError,
    GpurunError,
    Interrupted,
    LedgerError,
    NotFoundError,
    RefusedError,
)
from gpurun.external import busy_outside
from gpurun.ledger import (
    Holder,
    Lease,
    Ledger,
    Request,
    State,
    Watcher,
    create_afresh,
    finished_record,
    open_ledger,
)
from gpurun.log import get_logger
from gpurun.placement import check_limits, check_possible, plural
from gpurun.record import record

log = get_logger(__name__)

POLL_SECONDS = 1.0
# Seconds a command runs before the ledger records its pid (see run_reserved).
RECORD_AFTER = 0.1
# A waiting gpurun asks again which GPUs are busy outside gpurun at most this often.
OUTSIDE_MAX_AGE = 5.0

_SpecBase = record(
    "_SpecBase", "request command name priority time_limit after after_any reservation"
)


class Spec(_SpecBase):
    """What the user asked for: request (Request, or None for all of a reservation), command
    (list of str), name (str or None), priority (int), time_limit (seconds or None), after
    (tuple of job ids), after_any (bool), reservation (the name or id to run inside, or None).
    """

    __slots__ = ()


class DependencyFailed(GpurunError):
    """A job named in --after failed, so this one was cancelled."""


def run_job(
    config: Config,
    spec: Spec,
    wait: bool = True,
    timeout: float | None = None,
    detach: bool = False,
) -> int:
    """Queue, run and free one job; return the exit status gpurun should exit with.

    With `detach`, the job goes on in a background gpurun and this returns 0 once it is
    queued, having printed its id.
    """
    executable, argv = supervise.exec_argv(supervise.resolve_command(spec.command[0]), spec.command)
    if spec.reservation is not None:
        from gpurun.reservations import run_inside

        return run_inside(config, spec, executable, argv)
    check_possible(spec.request, usable_gpus(config), config.cpus, mask_note(config))
    check_limits(spec.request, config.limits, config.server, config.path)
    if spec.priority > 0 and os.geteuid() != 0:
        raise RefusedError(f"only root may raise --priority above 0 (asked {spec.priority})")
    ledger = open_ledger(config)
    ledger.ensure_dirs()
    if spec.after:
        _check_known(ledger, spec.after)

    if detach:
        return _detach(ledger, config, spec, executable, argv)
    lease, lock_fd = reserve(ledger, config, spec, wait, timeout)
    return run_reserved(ledger, config, lease, lock_fd, executable, argv)


def reserve(
    ledger: Ledger,
    config: Config,
    spec: Spec,
    wait: bool,
    timeout: float | None,
    detached: bool = False,
    on_queued: object = None,
) -> tuple[Lease, int]:
    """Queue the job and wait until the queue's rules let it start; return its lease (now
    holding GPUs and CPUs) and its job lock.

    Ctrl-C, SIGTERM, SIGHUP, --timeout or a failed dependency take the entry out of the queue
    before raising. Returns with supervise.BLOCKED signals blocked, so none is lost before the
    command starts.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    progress = _Progress()
    watcher = None
    entry: Lease | None = None
    lock_fd = -1
    # Signals end the wait cleanly (Ctrl-C through KeyboardInterrupt), unless they are ignored
    # (nohup, a detached job).
    previous = {
        sig: signals.signal(sig, _raise_interrupted)
        for sig in supervise.FORWARDED[1:]
        if signals.getsignal(sig) != signals.SIG_IGN
    }
    outside_age = None
    written = False  # whether the ledger has recorded the entry, so history must too
    try:
        while True:
            cancelled = None
            outside = busy_outside(config, outside_age)
            outside_age = OUTSIDE_MAX_AGE
            with ledger.transaction(block=supervise.BLOCKED) as state:
                now = time.time()
                dead = reap_dead(ledger, state, now)
                if entry is None:
                    lease_id, lock_fd = _new_job(ledger, state)
                    entry = _new_entry(ledger, spec, lease_id, now, detached)
                    entry = entry._replace(gpu_mask=config.gpu_mask)
                    state.add(entry)
                found = state.find(entry.id)
                if found is None:
                    raise GpurunError(
                        f"job {entry.id} was taken out of the queue (by 'gpurun "
                        "reset'?); it did not run"
                    )
                entry = found
                dependencies = _Dependencies(ledger, state)
                if entry.state == "waiting" and dependencies(entry) == FAILED:
                    cancelled = dependencies.reason(entry)
                    state.finish(entry.id, ledger.server, "cancelled", None, cancelled)
                    place_admitted(state, config, now, dependencies, outside)
                else:
                    place_admitted(state, config, now, dependencies, outside)
                    entry = state.find(entry.id)
                    if entry.state == "running":
                        pass
                    elif not wait:
                        raise BusyError(
                            f"{describe_busy(spec.request, config, state, outside)}; "
                            "not waiting (--no-wait)"
                        )
                    else:
                        position, queued = _position(state, entry)
                        busy = describe_busy(spec.request, config, state, outside)
            written = True
            forget_dead(ledger, dead, now)
            if callable(on_queued):
                on_queued(entry)
                on_queued = None
            if cancelled is not None:
                # Jobs that run after this one are cancelled in turn: wake them.
                ledger.ring()
                raise DependencyFailed(f"job {entry.id} was cancelled: {cancelled}")
            if entry.state == "running":
                log.info(
                    "job %d placed on GPUs %s and CPUs %s",
                    entry.id,
                    ",".join(map(str, entry.gpus)) or "none",
                    format_cpulist(entry.cpus) or "none",
                )
                progress.started(entry)
                return entry, lock_fd
            log.debug("job %d waits, %d of %d in the queue", entry.id, position, queued)

            signals.pthread_sigmask(signals.SIG_UNBLOCK, supervise.BLOCKED)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise BusyError(f"{busy}; gave up after --timeout {timeout:g} s")
            progress.waiting(entry.id, position, queued, busy)
            # Watching starts only at the first wait, so that time it looks before waiting: a
            # placement in between would otherwise be seen only at the next poll. The look is
            # a read without the lock, as after each wait: in a crowd, a second transaction
            # per waiting gpurun queued them all for the lock once more.
            look_first = watcher is None
            if watcher is None:
                watched = (ledger.job_lock_path(entry.id), ledger.lock_path)
                # Closed only if the job does not start: closing it waits (see Watcher.close),
                # and the command does not inherit it (close-on-exec).
                watcher = Watcher(ledger.state_dir, watched)
            while True:
                if not look_first:
                    watcher.wait(POLL_SECONDS if left is None else min(left, POLL_SECONDS))
                    outside = busy_outside(config, OUTSIDE_MAX_AGE)
                look_first = False
                placed, snapshot = _placed_meanwhile(ledger, entry.id)
                if placed is not None:
                    log.info("job %d was placed while it waited", placed.id)
                    progress.started(placed)
                    return placed, lock_fd
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                if _worth_a_transaction(ledger, config, snapshot, entry.id, outside):
                    break
                if snapshot is not None and snapshot.find(entry.id) is not None:
                    position, queued = _position(snapshot, entry)  # as the queue moves
                progress.waiting(entry.id, position, queued, busy)
    except BaseException as exc:
        progress.clear()
        signals.pthread_sigmask(signals.SIG_BLOCK, supervise.BLOCKED)
        if entry is not None:
            _withdraw(ledger, entry, lock_fd, exc, written)
        signals.pthread_sigmask(signals.SIG_UNBLOCK, supervise.BLOCKED)
        if watcher is not None:
            watcher.close()
        raise
    finally:
        for sig, handler in previous.items():
            signals.signal(sig, handler)


def run_reserved(
    ledger: Ledger, config: Config, lease: Lease, lock_fd: int, executable: str, argv: list[str]
) -> int:
    """Start the command in its lease, supervise it, free the lease; return the exit status.

    Called with supervise.BLOCKED signals blocked.
    """
    pending = signals.sigpending() & set(supervise.ENDING)
    if pending:
        interrupted = Interrupted(min(pending))
        _withdraw(ledger, lease, lock_fd, interrupted, True)
        raise interrupted
    try:
        pid = supervise.spawn(executable, argv, job_env(lease, config), lease.cpus)
    except OSError as exc:
        failure: GpurunError
        if isinstance(exc, PermissionError) or exc.errno == 8:
            failure = CommandError(lease.command[0], f"cannot run it ({exc.strerror})", 126)
        elif isinstance(exc, FileNotFoundError):
            failure = CommandError(lease.command[0], "command not found", 127)
        else:
            failure = GpurunError(
                f"cannot start {lease.command[0]} on CPUs {format_cpulist(lease.cpus)}: "
                f"{exc.strerror}"
            )
        _withdraw(ledger, lease, lock_fd, failure, True)
        raise failure from None
    started = time.time()
    log.info("job %d started: pid %d, %s", lease.id, pid, " ".join(lease.command))
    start = liveness.process_start(pid)
    if start is not None:
        liveness.write_command_holder(liveness.pid_path(ledger.job_lock_path(lease.id)), pid, start)
        lease = lease._replace(holders=(*lease.holders, Holder(pid, start, "command")))
    lease = lease._replace(started=started)

    deadline = None
    if lease.time_limit is not None:
        deadline = time.monotonic() + lease.time_limit

    def overrun() -> None:
        supervise.say(
            f"job {lease.id} ({lease.name}) ran past its --time limit of "
            f"{lease.time_limit:g} s; sending SIGTERM, then SIGKILL after "
            f"{config.kill_grace:g} s"
        )

    # The ledger learns the command's pid and start only if it still runs after a moment:
    # a short command is recorded once, as it ends, and a crowd of them takes the ledger
    # lock a third less often. Its pid file has both meanwhile (write_command_holder).
    recording = (time.monotonic() + RECORD_AFTER, lambda: _record_command(ledger, lease))
    status = supervise.wait_for_command(pid, deadline, config.kill_grace, overrun, recording)
    supervise.end_leftovers(config.kill_grace)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        supervise.say(f"job {lease.id} ({lease.name}) was ended by {signals.name(-code)}")
        code = 128 - code
    record = _release(ledger, config, lease, lock_fd, code)
    if config.on_finish:
        run_hook(config.on_finish, record)
    return code


def place_admitted(
    state: State,
    config: Config,
    now: float,
    dependencies: object,
    outside: dict[int, str] | None = None,
) -> None:
    """Give every waiting lease the queue's rules admit now its GPUs and CPUs (under the lock).

    Whoever holds the lock places all of them in queue order, so placement follows the queue
    even when the waiting gpurun processes wake in another order; each then finds its lease
    placed and starts its command. `outside`: GPUs busy outside gpurun (external.py), never
    handed out.
    """
    state.admitted = True
    admitted = admit_on(config, state.leases, now, dependencies, outside)
    for lease_id, (gpus, cpus) in admitted.items():
        lease = state.find(lease_id)
        state.replace(lease._replace(state="running", gpus=gpus, cpus=cpus, placed=now))


def admit_on(
    config: Config,
    leases: list[Lease],
    now: float,
    dependencies: object,
    outside: dict[int, str] | None = None,
) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """admission.admit with everything this host's placement uses: its inventory, topology
    and the GPUs busy outside gpurun. Jobs and reservations (`alloc`) both come through here,
    so both are placed by the same rules."""
    return admit(
        leases,
        config.gpus,
        config.cpus,
        now,
        dependencies,
        config.topology,
        frozenset(outside or ()),
    )


def reap_dead(ledger: Ledger, state: State, now: float) -> list[Lease]:
    """Drop the dead leases from `state` (under the lock), record them, and return them.

    A lease already in history (its holder crashed after recording its end, before the
    ledger write) is dropped without a second record.
    """
    dead = [lease for lease in state.leases if not ledger.alive(lease, now)]
    recorded = ledger.finished_jobs({lease.id for lease in dead}) if dead else {}
    for lease in dead:
        if lease.id in recorded:
            state.remove(lease.id)
        else:
            ending = "expired" if lease.kind == "reservation" else "dead"
            state.finish(lease.id, ledger.server, ending)
        log.info("reaped dead lease %d (%s)", lease.id, lease.name)
    return dead


def forget_dead(ledger: Ledger, dead: list[Lease], now: float) -> None:
    """After the reaping transaction: remove the dead jobs' locks, and wake the waiting
    gpuruns, as jobs that run after a dead one are now cancelled."""
    if not dead:
        return
    for lease in dead:
        _unlink_job_files(ledger, lease.id)
        _remove_inner(ledger, lease.id)
    ledger.ring()


def inner_state_dir(ledger: Ledger, lease_id: int) -> str:
    """The private state dir of gpuruns run inside the job (see masks.parent_job)."""
    return os.path.join(ledger.jobs_dir, f"{ledger.server}.{lease_id}.d")


def _remove_inner(ledger: Ledger, lease_id: int) -> None:
    """Remove the job's private ledger, if gpurun ran inside it; its jobs ended with it."""
    folder = inner_state_dir(ledger, lease_id)
    if os.path.isdir(folder):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def held_ids(leases: list[Lease]) -> tuple[set[int], set[int]]:
    gpus: set[int] = set()
    cpus: set[int] = set()
    for lease in leases:
        gpus.update(lease.gpus)
        cpus.update(lease.cpus)
    return gpus, cpus


def describe_busy(
    request: Request, config: Config, state: State, outside: dict[int, str] | None = None
) -> str:
    """One phrase: what the request waits for, which jobs hold it, and what else keeps GPUs
    from it (an inherited mask, use outside gpurun)."""
    running = [lease for lease in state.leases if lease.state == "running"]
    waiting = [lease for lease in state.leases if lease.state == "waiting"]
    held_gpus, held_cpus = held_ids(running)
    holders = ", ".join(f"{lease.id} ({lease.user}, {lease.name})" for lease in running[:5])
    if len(running) > 5:
        holders += f" and {len(running) - 5} more"
    if request.gpu_ids is not None:
        want = f"GPUs {','.join(map(str, request.gpu_ids))}"
    else:
        want = plural(request.gpus, "GPU")
    text = (
        f"needs {want} and {plural(request.cpus, 'CPU')}; {len(held_gpus)} of "
        f"{len(config.gpus)} GPUs and {len(held_cpus)} of {len(config.cpus)} CPUs are held"
    )
    if holders:
        text += f" by jobs {holders}"
    text += not_handed_out(config, outside, held_gpus)
    others = len(waiting) - 1
    if others > 0:
        text += f"; {others} other {'job waits' if others == 1 else 'jobs wait'}"
    return text


def not_handed_out(
    config: Config, outside: dict[int, str] | None, held: set[int] | frozenset[int] = frozenset()
) -> str:
    """ "; ..." naming the GPUs no lease holds that are kept from jobs anyway: outside an
    inherited mask, or busy outside gpurun; "" when there are none."""
    parts = []
    if config.gpu_mask is not None:
        allowed = ",".join(map(str, usable_gpus(config))) or "none"
        parts.append(f"$CUDA_VISIBLE_DEVICES allows only GPUs {allowed}")
    busy = sorted(g for g in outside or () if g in config.gpus and g not in held)
    if busy:
        listed = "; ".join(f"GPU {g}: {outside[g]}" for g in busy[:4])
        more = f" and {len(busy) - 4} more" if len(busy) > 4 else ""
        parts.append(f"busy outside gpurun: {listed}{more}")
    return "".join(f"; {part}" for part in parts)


def usable_gpus(config: Config) -> tuple[int, ...]:
    """The GPUs this gpurun may hand out: the server's, narrowed by an inherited mask."""
    if config.gpu_mask is None:
        return config.gpus
    return tuple(g for g in config.gpus if g in config.gpu_mask)


def mask_note(config: Config) -> str:
    """What an inherited mask hides, for a capacity message; "" when it hides nothing."""
    hidden = len(config.gpus) - len(usable_gpus(config))
    if not hidden:
        return ""
    return f"$CUDA_VISIBLE_DEVICES hides the other {plural(hidden, 'GPU')} of {len(config.gpus)}"


def export_form(config: Config) -> str:
    """How CUDA_VISIBLE_DEVICES names GPUs: as an inherited mask did, else `visible_devices`."""
    return config.mask_form if config.gpu_mask is not None else config.visible_devices


def visible_devices(config: Config, gpus: tuple[int, ...]) -> str:
    """CUDA_VISIBLE_DEVICES for a lease of this host on `gpus`, for a job or a reservation:
    in the form export_form says, a MIG slice always by its UUID."""
    from gpurun.masks import export_gpus

    return export_gpus(gpus, config.devices, export_form(config))


def job_env(lease: Lease, config: Config) -> dict[str, str]:
    """The job's environment: CUDA_VISIBLE_DEVICES replaces any inherited value (it never
    adds to it); GPURUN_GPUS has the physical ids, whatever form CUDA gets."""
    env = dict(os.environ)
    ids = ",".join(map(str, lease.gpus))
    env["CUDA_VISIBLE_DEVICES"] = visible_devices(config, lease.gpus)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["GPURUN_JOB_ID"] = str(lease.id)
    env["GPURUN_GPUS"] = ids
    env["GPURUN_CPUS"] = format_cpulist(lease.cpus)
    if lease.cpus and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(len(lease.cpus))
    return env


def run_hook(command: str, record: dict[str, object]) -> None:
    """Start `on_finish` with the job's record (as `ps -a --json` shows it) as JSON on stdin;
    never wait for it."""
    import json

    from gpurun.jobs import history_view

    record = history_view(record)

    read_end, write_end = os.pipe()
    data = json.dumps(record).encode() + b"\n"
    try:
        pid = os.posix_spawn(
            "/bin/sh",
            ["sh", "-c", command],
            dict(os.environ, GPURUN_JOB_ID=str(record["id"])),
            file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0)],
            setsid=True,
            setsigmask=(),
            setsigdef=(signals.SIGPIPE, signals.SIGXFSZ),
        )
    except OSError as exc:
        log.warning("on_finish could not start: %s", exc.strerror)
        return
    finally:
        os.close(read_end)
    # The record fits a pipe's buffer, so this write does not wait for the hook; a record too
    # large for it is cut short rather than delaying anything.
    os.set_blocking(write_end, False)
    try:
        os.write(write_end, data)
    except (BlockingIOError, BrokenPipeError):
        log.debug("on_finish %d did not take its input", pid)
    finally:
        os.close(write_end)


def _new_entry(ledger: Ledger, spec: Spec, lease_id: int, now: float, detached: bool) -> Lease:
    me = os.getpid()
    return Lease(
        id=lease_id,
        kind="job",
        state="waiting",
        name=spec.name or os.path.basename(spec.command[0]),
        user=_user_name(),
        uid=os.getuid(),
        host=os.uname().nodename,
        gpus=(),
        cpus=(),
        command=tuple(spec.command),
        created=now,
        started=None,
        holders=(Holder(me, liveness.process_start(me), "gpurun"),),
        boot=liveness.boot_id(),
        expires=None,
        request=spec.request,
        priority=spec.priority,
        time_limit=spec.time_limit,
        after=tuple(spec.after),
        after_any=spec.after_any,
        log=ledger.log_path(lease_id) if detached else None,
        placed=None,
        reservation=None,
    )


def _placed_meanwhile(ledger: Ledger, lease_id: int) -> tuple[Lease | None, State | None]:
    """The waiting job's lease if whoever freed GPUs placed it meanwhile, else None; and the
    ledger as read (None if it could not be read).

    Read without the lock: only the job itself changes its lease once it is placed, so a
    waiting gpurun woken by its placement starts without queueing for the lock behind
    everyone else. Blocks supervise.BLOCKED before it looks, as reserve returns so.
    """
    signals.pthread_sigmask(signals.SIG_BLOCK, supervise.BLOCKED)
    try:
        state = ledger.read()
    except LedgerError:
        state = None
    lease = None if state is None else state.find(lease_id)
    if lease is not None and lease.state == "running":
        return lease, state
    signals.pthread_sigmask(signals.SIG_UNBLOCK, supervise.BLOCKED)
    return None, state


def _worth_a_transaction(
    ledger: Ledger,
    config: Config,
    state: State | None,
    lease_id: int,
    outside: dict[int, str] | None,
) -> bool:
    """Whether the waiting job's transaction could change anything now, judged on a snapshot
    read without the lock: a lease to reap, its dependencies failed, a job to place, or its
    lease gone or changed. That transaction applies the same rules to the same leases, so
    when this says no it would have written nothing; skipping it keeps a crowd of waiting
    gpuruns, each woken by its poll, from queueing for the lock to redo the admission of
    every lease. Anything that changes the ledger after the snapshot either places who it
    can itself (and wakes them) or wakes every waiting gpurun to look again. `state`: the
    snapshot, None when it could not be read (the transaction says why)."""
    if state is None:
        return True
    entry = state.find(lease_id)
    if entry is None or entry.state != "waiting":
        return True
    now = time.time()
    if any(not ledger.alive(lease, now) for lease in state.leases):
        return True
    dependencies = _Dependencies(ledger, state)
    if dependencies(entry) == FAILED:
        return True
    return bool(admit_on(config, state.leases, now, dependencies, outside))


def _position(state: State, entry: Lease) -> tuple[int, int]:
    order = [lease.id for lease in queue_order(state.leases)]
    return order.index(entry.id) + 1, len(order)


class _Dependencies:
    """Whether a lease's --after jobs let it start, from the ledger and then history."""

    def __init__(self, ledger: Ledger, state: State) -> None:
        self.ledger = ledger
        self.live = {lease.id for lease in state.leases}
        self.finished: dict[int, dict[str, object]] | None = None

    def __call__(self, lease: Lease) -> str:
        if not lease.after:
            return READY
        if any(dep in self.live for dep in lease.after):
            return BLOCKED
        return FAILED if self.reason(lease) else READY

    def reason(self, lease: Lease) -> str | None:
        """Why the dependencies failed, or None if they all succeeded as required."""
        if self.finished is None:
            self.finished = self.ledger.finished_jobs(
                {dep for dep in lease.after if dep not in self.live}
            )
        for dep in lease.after:
            record = self.finished.get(dep)
            if record is None:
                self.finished.update(self.ledger.finished_jobs({dep}))
                record = self.finished.get(dep)
            if record is None:
                return f"job {dep}, which it runs after, is unknown"
            if lease.after_any:
                continue
            if record.get("exit_code") != 0:
                how = record.get("exit_code")
                outcome = f"exit {how}" if how is not None else f"it {record.get('state')}"
                return f"job {dep}, which it runs after, failed: {outcome}"
        return None


def _check_known(ledger: Ledger, ids: tuple[int, ...]) -> None:
    live = {lease.id for lease in ledger.read().leases}
    unknown = set(ids) - live
    if unknown:
        unknown -= set(ledger.finished_jobs(unknown))
    if unknown:
        listed = ", ".join(map(str, sorted(unknown)))
        raise NotFoundError(f"--after names no known job: {listed}; 'gpurun ps -a' lists them")


def _detach(ledger: Ledger, config: Config, spec: Spec, executable: str, argv: list[str]) -> int:
    """Fork a gpurun that queues and runs the job in its own session; print the job's id."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with open(read_end, "rb") as pipe:
            answer = pipe.read().decode(errors="replace").strip()
        if answer.startswith("id "):
            print(answer[3:])
            return 0
        raise GpurunError(answer.removeprefix("error ") or "the detached job could not be queued")

    code = 125
    told: list[int] = []  # the job id, once the parent has it and the pipe is closed
    try:
        os.close(read_end)
        os.setsid()
        signals.signal(signals.SIGHUP, signals.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)

        def queued(entry: Lease) -> None:
            # Made afresh: logs/ is every user's, and a file or FIFO someone left under
            # this name would get (or hold up) the job's output.
            try:
                out = create_afresh(entry.log, os.O_WRONLY | os.O_APPEND, 0o644)
            except OSError as exc:
                raise GpurunError(
                    f"cannot make the job's log {entry.log}: {exc.strerror}"
                ) from None
            os.write(write_end, f"id {entry.id}\n".encode())
            os.close(write_end)
            told.append(entry.id)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)

        lease, lock_fd = reserve(ledger, config, spec, True, None, True, queued)
        code = run_reserved(ledger, config, lease, lock_fd, executable, argv)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, GpurunError) else repr(exc)
        # Before the job was queued the parent says it; after, the job's log gets it (the
        # pipe's descriptor number may belong to another file by then).
        try:
            if told:
                os.write(2, f"gpurun: {message}\n".encode())
            else:
                os.write(write_end, f"error {message}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _record_command(ledger: Ledger, lease: Lease) -> None:
    """Write the lease with its command's pid and start time; the job lock covers a failure."""
    try:
        with ledger.transaction() as state:
            if state.find(lease.id) is not None:
                state.replace(lease)
    except LedgerError as exc:
        log.warning(
            "could not record the command's pid in the ledger (%s); the job lock "
            "still keeps the lease",
            exc,
        )


def _release(
    ledger: Ledger, config: Config, lease: Lease, lock_fd: int, code: int
) -> dict[str, object]:
    """Remove the lease and append the job to history in one change, place the jobs that can
    start now, drop the job lock; return the history record."""
    record = finished_record(lease, ledger.server, time.time(), code, "exited")
    outside = busy_outside(config, 0.0)
    dependents = False
    try:
        with ledger.transaction() as state:
            # Recorded even if a forced reset dropped the lease (the job did run and end),
            # but never twice.
            if state.remove(lease.id) is not None or not ledger.finished_jobs({lease.id}):
                state.finished.append(record)
            place_admitted(state, config, time.time(), _Dependencies(ledger, state), outside)
            dependents = any(lease.id in other.after for other in state.leases)
    except LedgerError as exc:
        log.warning(
            "could not remove lease %d (%s); the next gpurun or 'gpurun gc' will reap it",
            lease.id,
            exc,
        )
        # No one reaps the lease while this gpurun holds the job lock, so the record cannot
        # be written twice; the reaper finds it and adds none.
        if not ledger.finished_jobs({lease.id}):
            ledger.append_history([record])
    log.info("job %d ended with %d; its lease is freed", lease.id, code)
    if dependents:
        # Jobs that run after this one learn how it ended from history: wake them.
        ledger.ring()
    os.close(lock_fd)
    _unlink_job_files(ledger, lease.id)
    _remove_inner(ledger, lease.id)
    return record


def _withdraw(
    ledger: Ledger, entry: Lease, lock_fd: int, why: BaseException, written: bool
) -> None:
    """Take a lease that never ran out of the ledger and record it in history as withdrawn,
    with the exit code gpurun gives for `why` and the reason. Its id is not given back: a
    detached job's id was printed, and `gpurun wait` must never find another job under it.

    `written`: the ledger recorded the entry once, so history gets it even if a forced reset
    dropped it since (never twice); an entry no write ever held (`--no-wait` that did not
    fit) leaves no trace."""
    code, reason = _withdrawn(why)
    try:
        with ledger.transaction() as state:
            gone = state.finish(entry.id, ledger.server, "withdrawn", code, reason) is None
            if gone and written and not ledger.finished_jobs({entry.id}):
                state.finished.append(
                    finished_record(entry, ledger.server, time.time(), code, "withdrawn", reason)
                )
    except LedgerError as exc:
        log.warning(
            "could not remove job %d from the ledger (%s); it is dead and will be reaped",
            entry.id,
            exc,
        )
    if lock_fd >= 0:
        os.close(lock_fd)
    _unlink_job_files(ledger, entry.id)


def _withdrawn(why: BaseException) -> tuple[int, str]:
    """The exit code gpurun gives for a job that left the queue this way, and the reason."""
    if isinstance(why, Interrupted):
        return 128 + why.signum, f"interrupted by signal {why.signum} before it started"
    if isinstance(why, KeyboardInterrupt):
        return 130, "interrupted (Ctrl-C) before it started"
    if isinstance(why, BusyError):
        return 75, "gave up waiting (--timeout)"
    if isinstance(why, CommandError):
        return why.exit_code, str(why)
    return 125, f"left the queue: {why}"[:200]


def _new_job(ledger: Ledger, state: State) -> tuple[int, int]:
    """Take the next job id and create its lock; skip ids whose lock a live job still holds
    (a ledger reset or moved aside without --force forgets nothing the kernel knows)."""
    for _ in range(1000):
        lease_id = state.take_id()
        try:
            return lease_id, liveness.lock_job(ledger.job_lock_path(lease_id))
        except FileExistsError:
            log.warning(
                "job id %d is still held by a live job outside the ledger; skipping it", lease_id
            )
        except OSError as exc:
            raise LedgerError(
                ledger.job_lock_path(lease_id),
                f"cannot create the job lock ({exc.strerror}); the ledger was left as it was; "
                "free space or fix the state folder's permissions",
            ) from None
    raise LedgerError(
        ledger.jobs_dir,
        "1000 job ids in a row are held by live jobs outside the ledger; run 'gpurun gc'",
    )


class _Progress:
    """What a waiting gpurun tells its user: at a terminal, one status line kept up to date;
    otherwise one line when it starts waiting and one when it starts running."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.since = time.monotonic()
        self.shown = False

    def waiting(self, job_id: int, position: int, queued: int, busy: str) -> None:
        waited = int(time.monotonic() - self.since)
        line = (
            f"gpurun: job {job_id} waiting {waited}s, {position} of {queued} in the queue: {busy}"
        )
        if self.tty:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
            sys.stderr.write("\r\033[K" + line[: max(width - 1, 20)])
            sys.stderr.flush()
        elif not self.shown:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        self.shown = True

    def started(self, lease: Lease) -> None:
        if not self.shown:
            return
        self.clear()
        waited = time.monotonic() - self.since
        supervise.say(
            f"job {lease.id} starting after waiting {waited:.1f} s, on GPUs "
            f"{','.join(map(str, lease.gpus)) or 'none'} and CPUs "
            f"{format_cpulist(lease.cpus) or 'none'}"
        )

    def clear(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _unlink_job_files(ledger: Ledger, lease_id: int) -> None:
    """Remove a job's lock and pid file once its lease is gone."""
    lock_path = ledger.job_lock_path(lease_id)
    _unlink(lock_path)
    _unlink(liveness.pid_path(lock_path))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
