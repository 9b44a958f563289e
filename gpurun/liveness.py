"""Is a lease's job still there? The rule that decides when GPUs come back.

A lease is dead only when every sign of its job is provably gone; when unsure, it is kept
("fail closed"), as filelock and psutil judge stale holders. The signs are:

- each holder, a (pid, start time) pair: the pid alone is not enough, since Linux reuses pids.
  The start time is field 22 of /proc/PID/stat (clock ticks since boot), compared exactly.
  A zombie is not alive. A pid that /proc hides from us (mounted with hidepid) but that
  kill(pid, 0) answers with EPERM is another user's live process: kept.
- the job lock, a file the launching gpurun locks with flock(2) and passes on to the command
  as an open descriptor. The kernel frees the lock when the last process holding that
  descriptor is gone, so it covers the moment between starting the command and recording its
  pid, a gpurun killed with SIGKILL, and processes we cannot see.
- the boot: start times count from boot, so a lease recorded under another boot id is dead.
"""

from __future__ import annotations

import fcntl
import os

_boot_id: str | None = None

# How a job's files are opened to be read or probed: never through a link, and never waiting,
# as an open of a FIFO someone made in their place would, with every gpurun behind the
# ledger lock.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def boot_id() -> str:
    """This boot's id from /proc/sys/kernel/random/boot_id ("" where the kernel has none)."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def process_start(pid: int) -> int | None:
    """Return the start time of a live process in clock ticks since boot, or None.

    None means gone or a zombie. Raises PermissionError when the process exists but /proc
    does not show it to us.
    """
    try:
        stat = _read_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            raise PermissionError(pid) from None
        return None
    # The command name in field 2 may hold spaces and parentheses; fields after it are fixed.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _read_stat(pid: int) -> bytes:
    """/proc/PID/stat; os.open and os.read rather than open(), as `ps` reads one per lease."""
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def holder_alive(pid: int, start: int) -> bool:
    """True while the process `pid` that started at `start` runs (or cannot be ruled out)."""
    try:
        return process_start(pid) == start
    except PermissionError:
        return True


def job_lock_held(path: str) -> bool:
    """True while some process holds the job lock at `path`.

    A missing file is "not held"; the pids decide then. An error other than "locked" keeps
    the lease (fail closed).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def lock_job(path: str) -> int:
    """Create and lock a new job lock at `path`; return its descriptor, inheritable by the job.

    The file is created under a temporary name, made readable by every user (whatever our
    umask) and locked before it is renamed into place, so no one ever sees it half made.
    Raises FileExistsError if a live job holds a lock at `path` already; a stale file there is
    replaced. Call it under the ledger lock.
    """
    if job_lock_held(path):
        raise FileExistsError(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.new")
    from gpurun.ledger import create_afresh

    fd = create_afresh(tmp, os.O_RDWR, 0o666)
    try:
        os.fchmod(fd, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, path)
        os.set_inheritable(fd, True)
    except OSError:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd


def lease_alive(lease: object, lock_path: str, now: float) -> bool:
    """Apply the rule above to a ledger `Lease`; a reservation lives until it expires."""
    if lease.kind == "reservation":
        return lease.expires is None or now < lease.expires
    if lease.boot != boot_id():
        return False
    # The job lock first: a live job holds it, and probing it costs half of reading a
    # holder's /proc/PID/stat, which `ps` and every launch would do for each lease.
    if job_lock_held(lock_path):
        return True
    if any(holder_alive(h.pid, h.start) for h in lease.holders):
        return True
    written = unrecorded_command(lease, lock_path)
    return written is not None and holder_alive(*written)


def live_ids(leases: list, lock_prefix: str, now: float) -> set[int]:
    """The ids of the live ones among `leases` by lease_alive, where a job's lock is at
    f"{lock_prefix}{id}.lock". `ps` and `status` judge every lease, so the usual one, a job of
    this boot that holds its lock, is judged here with the probe inline: that is a tenth of
    what judging 1,000 leases took. Any other lease goes through lease_alive."""
    boot = boot_id()
    live = set()
    for lease in leases:
        path = f"{lock_prefix}{lease.id}.lock"
        if lease.kind == "job" and lease.boot == boot:
            try:
                fd = os.open(path, _READ_FLAGS)
            except OSError:
                fd = -1  # lease_alive sorts out what that means
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    live.add(lease.id)  # held, or an error that keeps it, as job_lock_held
                    continue
                finally:
                    os.close(fd)
        if lease_alive(lease, path, now):
            live.add(lease.id)
    return live


def unrecorded_command(lease: object, lock_path: str) -> tuple[int, int] | None:
    """The (pid, start) of a job's command that the ledger does not have yet (its first
    moments, see launch.run_reserved), from its pid file; None if the ledger has it or there
    is none."""
    if any(h.role == "command" for h in lease.holders):
        return None
    return read_command_holder(pid_path(lock_path), lease.uid)


def pid_path(lock_path: str) -> str:
    """The file beside a job lock that holds its command's pid (see write_command_holder)."""
    return lock_path.removesuffix(".lock") + ".pid"


def write_command_holder(path: str, pid: int, start: int) -> None:
    """Write the command's pid and start time to `path` (pid_path), at once and with no lock.

    The ledger learns them a moment later (launch.run_reserved), or not at all for a command
    that ends first; until then a gpurun killed with SIGKILL whose command closed the job
    lock's descriptor would leave nothing of the job in sight. The file is the job user's
    and only they may write it (unlike the job lock, which every user may touch to wake a
    waiting job), so no one can keep another's lease alive by naming a process in it.
    """
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
    except OSError:
        return  # the ledger's record, a moment later, covers it
    try:
        os.fchmod(fd, 0o644)  # whatever our umask: other users' gpuruns judge the lease by it
        os.write(fd, f"{pid} {start}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def read_command_holder(path: str, uid: int) -> tuple[int, int] | None:
    """The (pid, start) in a job's pid file if the file is `uid`'s, else None."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != uid:
            return None
        pid, _, start = os.read(fd, 64).strip().partition(b" ")
    except OSError:
        return None
    finally:
        os.close(fd)
    if pid.isdigit() and start.isdigit() and 0 < int(pid) < 2**31:
        return int(pid), int(start)
    return None


def ancestry() -> dict[int, int]:
    """This process and its ancestors up to init: {pid: start time in clock ticks}."""
    found: dict[int, int] = {}
    pid = os.getpid()
    while pid > 1 and pid not in found:
        try:
            stat = _read_stat(pid)
        except OSError:
            break
        fields = stat[stat.rfind(b")") + 2 :].split()
        found[pid] = int(fields[19])
        pid = int(fields[1])
    return found


def lock_holders(path: str) -> list[int]:
    """The pids of the processes that have `path` open (those this user may look at), as
    /proc/PID/fd shows them; for a job lock, the job's processes."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        folder = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{folder}/{fd}") == path:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def descendants(root: int) -> list[int]:
    """The pids of every live process below `root`, parents before children.

    Reads each /proc/PID/stat once; a process that ends meanwhile is skipped.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop(0)
        for child in children.get(parent, ()):
            found.append(child)
            frontier.append(child)
    return found
