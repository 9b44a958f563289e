"""The ledger: one JSON file per server that records its leases, changed only under a lock.

Files in the state dir, for a server named S:

- `S.json`: the ledger. Every change is read-modify-write under the lock, written to a
  temporary file in the same folder, fsynced and renamed over the old one, so a reader without
  the lock sees the old state or the new one, never a torn file.
- `S.json.lock`: the lock, taken with flock(2). It is the same lock filelock's UnixFileLock
  takes, but gpurun takes it itself: importing filelock costs 45-110 ms, several times the
  interpreter's start (README, "Why no filelock or psutil"). The file is never deleted, so a
  crash leaves nothing that blocks anyone; the kernel drops the lock with its holder.
- `S.history.jsonl`: finished jobs, one JSON object a line, only ever appended.
- `jobs/S.ID.lock`: each job's lock (see liveness.py).

Records are namedtuples rather than frozen dataclasses because `dataclasses` costs more to
import than the whole launch may take. Schema rule: any new field bumps SCHEMA; a gpurun reads
older schemas and refuses newer ones, so an old gpurun never drops fields it does not know.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from gpurun import codec
from gpurun.errors import LedgerError
from gpurun.log import get_logger
from gpurun.record import record

# Only for annotations (see config.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from gpurun.config import Config

log = get_logger(__name__)

SCHEMA = 3
NAMES_LOCK = "names.lock"

# Test-only: GPURUN_CRASH_AT=POINT[:N] makes gpurun kill itself with SIGKILL the Nth time
# (default the first) it reaches that step of a ledger change, as a power cut or an OOM kill
# would (tests/test_crash.py). The points: "locked" (lock taken, nothing written),
# "temp-partial" (half the new ledger in the temporary file), "temp-written" (all of it, not
# yet fsynced), "before-rename" (fsynced) and "after-rename" (the new ledger in place, the
# lock still held). A launch makes three changes: place, record the command, release. It is
# read once here, so a launch pays one environment lookup for it.
CRASH_POINTS = ("locked", "temp-partial", "temp-written", "before-rename", "after-rename")
_CRASH_AT = os.environ.get("GPURUN_CRASH_AT")
_crash_count = [0]

# The fields a ledger record leaves out while they hold these values. Every gpurun that reads
# schema 3 reads a missing one as this default, so leaving them out needs no schema bump; it
# makes a usual record a fifth smaller, which `ps` and `status` decode once per lease.
_LEFT_OUT = (
    ("priority", 0),
    ("time_limit", None),
    ("after", []),
    ("after_any", False),
    ("log", None),
    ("placed", None),
    ("reservation", None),
    ("gpu_mask", None),
)

_RequestBase = record("_RequestBase", "gpus cpus gpu_ids")
_HolderBase = record("_HolderBase", "pid start role")
_LeaseBase = record(
    "_LeaseBase",
    "id kind state name user uid host gpus cpus command created started holders boot expires "
    "request priority time_limit after after_any log placed reservation gpu_mask",
    defaults=(None,),
)


class Request(_RequestBase):
    """What a job asks for: gpus (count), cpus (count), gpu_ids (tuple of exact ids or None).
    It is defined here, with the other records a lease is made of, so that reading a ledger
    (`ps`, `status`) loads none of placement and what it imports."""

    __slots__ = ()


class Holder(_HolderBase):
    """A process a lease belongs to: pid (int), start (clock ticks since boot, int) and role
    ("gpurun" for the supervising gpurun, "command" for the job's first process)."""

    __slots__ = ()


class Lease(_LeaseBase):
    """What a job or reservation holds.

    id: int, unique per server and increasing, so it is also the arrival order; kind: "job" or
    "reservation"; state: "waiting" (in the queue, holding nothing yet) or "running"; name,
    user, host: str; uid: int; gpus, cpus: tuples of ids held; command: tuple of str; created,
    started: Unix times (started None until the command runs); holders: tuple of Holder; boot:
    the boot id the holders' start times count from; expires: Unix time or None; request: the
    Request it was placed for; priority: int, higher first; time_limit: seconds or None;
    after: ids of jobs that must end first; after_any: start after them whatever their exit
    code (else only when all exited 0); log: the output file of a detached job, or None;
    placed: when it was given its GPUs and CPUs (None while waiting); reservation: for a job
    run inside a reservation (`run -r`), the reservation's id, else None; gpu_mask: the only
    GPU ids it may be placed on (an inherited $CUDA_VISIBLE_DEVICES, see masks.py), or None
    for any.

    Schema 1 ledgers (gpurun 0.1) lack the fields from `request` on, and schema 2 ledgers
    lack gpu_mask; they read as defaults.
    """

    __slots__ = ()

    def shown_pid(self) -> int | None:
        """The pid `ps` shows: the command's, else its gpurun's (a reservation has none)."""
        command = gpurun = None
        for holder in self.holders:
            if holder.role == "command":
                command = holder.pid
            elif holder.role == "gpurun":
                gpurun = holder.pid
        return gpurun if command is None else command

    def to_json(self) -> dict[str, object]:
        record = self._asdict()
        record["gpus"] = list(self.gpus)
        record["cpus"] = list(self.cpus)
        record["command"] = list(self.command)
        record["holders"] = [h._asdict() for h in self.holders]
        record["request"] = {
            "gpus": self.request.gpus,
            "cpus": self.request.cpus,
            "gpu_ids": None if self.request.gpu_ids is None else list(self.request.gpu_ids),
        }
        record["after"] = list(self.after)
        record["gpu_mask"] = None if self.gpu_mask is None else list(self.gpu_mask)
        return record

    @classmethod
    def from_json(cls, record: dict[str, object]) -> Lease:
        """Build a lease from its JSON object; raise ValueError when it is malformed.

        `ps` and `status` build one per lease, and calling a checker per field made this most
        of what they spent on 1,000 leases; so a record as gpurun writes it is checked in one
        flat pass, and only another record goes through the checker of each field.
        """
        lease = _written_lease(record) if type(record) is dict else None
        return lease if lease is not None else _checked_lease(record)


def _ledger_record(lease: Lease) -> dict[str, object]:
    """The lease's JSON object as the ledger keeps it: to_json() less the fields at their
    defaults (_LEFT_OUT), and less the request when it asked for exactly what the lease holds
    (which is how every schema 3 reader reads a missing one). History keeps every field, for
    whoever reads it."""
    record = lease.to_json()
    for field, default in _LEFT_OUT:
        value = record[field]
        if value == default and type(value) is type(default):
            del record[field]
    if lease.request == (len(lease.gpus), len(lease.cpus), None):
        del record["request"]
    return record


def _written_lease(record: dict[str, object]) -> Lease | None:
    """The lease of a record written the way gpurun writes it (schema 3, the exact types JSON
    gives, with or without the fields of _LEFT_OUT at their defaults), or None for any other
    record, well formed or not.

    It accepts only what _checked_lease accepts and builds the same lease from it, or the
    ledger would read differently by the path a record took (tests/test_units.py compares
    them on made-up records); what it leaves, _checked_lease accepts or words the error of.
    """
    get = record.get
    # Built by _make, from the values in order: the records' own __new__, which takes
    # keywords and defaults, was a fifth of this function's time.
    make_holder, make_lease, make_request = Holder._make, Lease._make, Request._make
    try:
        lease_id, kind, state = record["id"], record["kind"], record["state"]
        name, user, uid, host = record["name"], record["user"], record["uid"], record["host"]
        created, started, expires = record["created"], record["started"], record["expires"]
        boot, request, priority = record["boot"], get("request"), get("priority", 0)
        time_limit, log, placed = get("time_limit"), get("log"), get("placed")
        after, after_any = get("after", ()), get("after_any", False)
        reservation, gpu_mask = get("reservation"), get("gpu_mask")
        if not (
            type(lease_id) is int
            and 0 <= lease_id < 2**63
            and type(uid) is int
            and 0 <= uid < 2**63
            and (kind == "job" or kind == "reservation")
            and (state == "running" or state == "waiting")
            and type(kind) is type(state) is type(name) is type(user) is type(host) is str
            and type(boot) is str
            and type(created) is float
            and 0 <= created < 1e11
            and (started is None or (type(started) is float and 0 <= started < 1e11))
            and (expires is None or (type(expires) is float and 0 <= expires < 1e11))
            and (time_limit is None or (type(time_limit) is float and 0 <= time_limit < 1e11))
            and (placed is None or (type(placed) is float and 0 <= placed < 1e11))
            and type(priority) is int
            and -(2**31) < priority < 2**31
            and (after_any is True or after_any is False)
            and (log is None or type(log) is str)
            and (reservation is None or (type(reservation) is int and 0 <= reservation < 2**63))
            and (request is None or type(request) is dict)
        ):
            return None
        gpus, cpus = _ints(record["gpus"]), _ints(record["cpus"])
        if request is None:
            wanted = make_request((len(gpus), len(cpus), None))
        else:
            wanted_gpus, wanted_cpus, gpu_ids = request["gpus"], request["cpus"], request["gpu_ids"]
            if not (
                type(wanted_gpus) is int
                and 0 <= wanted_gpus < 2**63
                and type(wanted_cpus) is int
                and 0 <= wanted_cpus < 2**63
            ):
                return None
            gpu_ids = None if gpu_ids is None else _ints(gpu_ids)
            wanted = make_request((wanted_gpus, wanted_cpus, gpu_ids))
        holders = []
        for holder in record["holders"]:
            pid, start, role = holder["pid"], holder["start"], holder["role"]
            if (
                not (
                    type(pid) is int
                    and 0 <= pid < 2**31
                    and type(start) is int
                    and 0 <= start < 2**63
                )
                or type(role) is not str
            ):
                return None
            holders.append(make_holder((pid, start, role)))
        return make_lease(
            (
                lease_id,
                kind,
                state,
                name,
                user,
                uid,
                host,
                gpus,
                cpus,
                _strs(record["command"]),
                created,
                started,
                tuple(holders),
                boot,
                expires,
                wanted,
                priority,
                time_limit,
                _ints(after),
                after_any,
                log,
                placed,
                reservation,
                None if gpu_mask is None else _ints(gpu_mask),
            )
        )
    except (KeyError, TypeError):
        return None


def _checked_lease(record: dict[str, object]) -> Lease:
    """Build a lease from its JSON object field by field; raise ValueError, naming the first
    field that is malformed."""
    try:
        get = record.get
        started = record["started"]
        expires = record["expires"]
        log = get("log")
        reservation = get("reservation")
        lease = Lease(
            _int(record["id"]),
            _choice(record["kind"], ("job", "reservation")),
            _choice(record["state"], ("waiting", "running")),
            _str(record["name"]),
            _str(record["user"]),
            _int(record["uid"]),
            _str(record["host"]),
            _ints(record["gpus"]),
            _ints(record["cpus"]),
            _strs(record["command"]),
            _num(record["created"]),
            None if started is None else _num(started),
            tuple(
                Holder(_pid(h["pid"]), _int(h["start"]), _str(h["role"])) for h in record["holders"]
            ),
            _str(record["boot"]),
            None if expires is None else _num(expires),
            _request(get("request"), record),
            _signed(get("priority", 0)),
            _optional_num(get("time_limit")),
            _ints(get("after", ())),
            _bool(get("after_any", False)),
            None if log is None else _str(log),
            _optional_num(get("placed")),
            None if reservation is None else _int(reservation),
            None if get("gpu_mask") is None else _ints(record["gpu_mask"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        which = record.get("id") if isinstance(record, dict) else None
        raise ValueError(f"lease {which!r} is malformed ({type(exc).__name__}: {exc})") from None
    return lease


def _ints(values: object) -> tuple[int, ...]:
    """A list of ids: whole numbers >= 0."""
    if type(values) is not list and type(values) is not tuple:
        raise TypeError(f"{values!r} is not a list")
    for value in values:
        if type(value) is not int or not 0 <= value < 2**63:
            raise TypeError(f"{value!r} is not a whole number >= 0")
    return tuple(values)


def _strs(values: object) -> tuple[str, ...]:
    if type(values) is not list and type(values) is not tuple:
        raise TypeError(f"{values!r} is not a list")
    for value in values:
        if type(value) is not str:
            raise TypeError(f"{value!r} is not a string")
    return tuple(values)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise TypeError(f"{value!r} is not a whole number >= 0")
    return value


def _pid(value: object) -> int:
    """A process id: the kernel's are below 2**22 (proc(5), pid_max); 2**31 leaves room."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise TypeError(f"{value!r} is not a process id")
    return value


def _signed(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**31) < value < 2**31:
        raise TypeError(f"{value!r} is not a whole number")
    return value


def _num(value: object) -> float:
    """A time or duration: finite, >= 0 and before the year 5000."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e11:
        raise TypeError(f"{value!r} is not a time or duration gpurun writes")
    return float(value)


def _optional_num(value: object) -> float | None:
    return None if value is None else _num(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not true or false")
    return value


def _request(value: object, record: dict[str, object]) -> Request:
    """The request a lease was placed for; a schema 1 lease asked for what it holds."""
    if value is None:
        return Request(len(record["gpus"]), len(record["cpus"]), None)
    gpu_ids = value["gpu_ids"]
    return Request(
        _int(value["gpus"]),
        _int(value["cpus"]),
        None if gpu_ids is None else tuple(_int(i) for i in gpu_ids),
    )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _choice(value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise TypeError(f"{value!r} is not one of {allowed}")
    return str(value)


class LockTimeout(Exception):
    """The ledger lock was not free within lock_timeout."""


class State:
    """The ledger's content while a transaction holds the lock; `changed` marks it for writing.

    heartbeat: when the server's own host last wrote it (0 if never); boot: that host's boot
    id; inventory: {"gpus": [...], "cpus": [...]} as that host last saw them, or None;
    finished: history records of the jobs this change ends (see `finish`).
    """

    __slots__ = (
        "admitted",
        "boot",
        "changed",
        "finished",
        "heartbeat",
        "inventory",
        "leases",
        "next_id",
        "placed",
        "removed",
        "schema",
    )

    def __init__(
        self,
        leases: list[Lease],
        next_id: int,
        heartbeat: float,
        boot: str = "",
        inventory: dict[str, list[int]] | None = None,
    ) -> None:
        self.leases = leases
        self.next_id = next_id
        self.heartbeat = heartbeat
        self.boot = boot
        self.inventory = inventory
        self.changed = False
        self.finished: list[dict[str, object]] = []
        # The schema the ledger was read in; an older one is upgraded, and said so, on write.
        self.schema = SCHEMA
        # For the wake-ups after the write (Transaction): leases given their GPUs and CPUs,
        # whether any lease left, and whether the writer ran the queue's admission.
        self.placed: list[int] = []
        self.removed = False
        self.admitted = False

    def add(self, lease: Lease) -> None:
        _readable(lease)
        self.leases.append(lease)
        self.changed = True

    def replace(self, lease: Lease) -> None:
        _readable(lease)
        for i, old in enumerate(self.leases):
            if old.id == lease.id:
                if old.state == "waiting" and lease.state == "running":
                    self.placed.append(lease.id)
                self.leases[i] = lease
        self.changed = True

    def remove(self, lease_id: int) -> Lease | None:
        for i, old in enumerate(self.leases):
            if old.id == lease_id:
                del self.leases[i]
                self.changed = True
                self.removed = True
                return old
        return None

    def finish(
        self,
        lease_id: int,
        server: str,
        ending: str,
        code: int | None = None,
        reason: str | None = None,
    ) -> Lease | None:
        """Remove a lease and record how it ended (see `finished_record`); return it, or None
        if it was not there.

        The transaction appends the records to history before it writes the ledger, so a
        reader who finds a job gone from the ledger always finds it in history. A crash
        between the two leaves the lease listed; whoever reaps it later finds it in history
        already and does not record it twice.
        """
        lease = self.remove(lease_id)
        if lease is not None:
            self.finished.append(finished_record(lease, server, time.time(), code, ending, reason))
        return lease

    def take_id(self) -> int:
        lease_id = self.next_id
        self.next_id += 1
        self.changed = True
        return lease_id

    def find(self, lease_id: int) -> Lease | None:
        for lease in self.leases:
            if lease.id == lease_id:
                return lease
        return None


def _readable(lease: Lease) -> None:
    """Refuse a lease the next reader would refuse: whatever slipped past the checks of the
    command line must never make the ledger unreadable for everyone."""
    try:
        Lease.from_json(lease.to_json())
    except ValueError as exc:
        raise LedgerError("the ledger", f"refusing to record lease {lease.id}: {exc}") from None


def finished_record(
    lease: Lease,
    server: str,
    ended: float,
    code: int | None,
    state: str,
    reason: str | None = None,
) -> dict[str, object]:
    """The history line for a lease that ended: `state` is exited, dead, cancelled,
    withdrawn, expired or released; `code` is what gpurun exited with for it, or None."""
    record = lease.to_json()
    del record["holders"], record["boot"]
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
    if reason:
        record["reason"] = reason
    return record


class Ledger:
    """The files of one server's ledger in `state_dir`.

    `owner`: this host is that server, so it judges its leases' liveness and stamps its
    heartbeat, boot id and `inventory` (the GPU and CPU ids it has) on every write. Another
    host may write a server's ledger only for reservations (`alloc`, `release`); such a write
    keeps the owner's heartbeat, boot id and inventory as they were.
    """

    def __init__(
        self,
        state_dir: str,
        server: str,
        lock_timeout: float = 60.0,
        named: bool = False,
        owner: bool = True,
        inventory: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.named = named
        self.owner = owner
        self.inventory = inventory
        self.server = server
        self.lock_timeout = lock_timeout
        self.path = os.path.join(state_dir, f"{server}.json")
        self.lock_path = self.path + ".lock"
        self.history_path = os.path.join(state_dir, f"{server}.history.jsonl")
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.logs_dir = os.path.join(state_dir, "logs")
        # Every job lock path but its id and suffix, joined once: `ps` needs one per lease.
        self._lock_prefix = os.path.join(self.jobs_dir, f"{server}.")
        self.checked = False

    def log_path(self, lease_id: int) -> str:
        """Where a detached job's output goes. The server's name is part of it because ids are
        per server and several servers may share one state dir."""
        return os.path.join(self.logs_dir, f"{self.server}.{lease_id}.log")

    def alive(self, lease: Lease, now: float) -> bool:
        """Whether the lease is live, by liveness.lease_alive. Only the owner can judge a job's
        processes; to another host a job lease is live until its owner drops it."""
        from gpurun.liveness import lease_alive

        if not self.owner and lease.kind == "job":
            return True
        return lease_alive(lease, self.job_lock_path(lease.id), now)

    def live_ids(self, leases: list[Lease], now: float) -> set[int]:
        """The ids of the live leases among `leases`, each judged as alive() judges it (see
        liveness.live_ids, which judges many at once)."""
        from gpurun.liveness import live_ids

        if not self.owner:
            return {lease.id for lease in leases if self.alive(lease, now)}
        return live_ids(leases, self._lock_prefix, now)

    def job_lock_path(self, lease_id: int) -> str:
        return f"{self._lock_prefix}{lease_id}.lock"

    def ring(self, lease_id: int | None = None) -> None:
        """Wake the waiting gpurun of `lease_id`, or with None every waiting gpurun of this
        server, by touching its job lock or the ledger lock (see Watcher). A file that cannot
        be touched leaves the wake to the waiters' poll."""
        path = self.lock_path if lease_id is None else self.job_lock_path(lease_id)
        try:
            os.utime(path)
        except OSError as exc:
            log.debug("cannot touch %s: %s", path, exc.strerror)

    def ring_after(self, state: State) -> None:
        """After a write: wake the gpuruns whose leases it placed; and if a lease left with no
        one admitting what it let start (gc, a withdrawn job), every waiting gpurun."""
        me = os.getpid()
        for lease_id in state.placed:
            lease = state.find(lease_id)
            if lease is not None and all(h.pid != me for h in lease.holders):
                self.ring(lease_id)
        if state.removed and not state.admitted:
            self.ring()

    def ensure_dirs(self) -> None:
        """Create the state dir and `jobs/` so that every user can write them.

        Both are mode 0777 without the sticky bit, set after mkdir so no umask narrows them:
        the ledger is replaced by rename, and in a sticky folder only a file's owner may rename
        over it (and fs.protected_regular refuses an O_CREAT open of another user's file).
        """
        if os.path.isdir(self.jobs_dir) and os.path.isdir(self.logs_dir):
            return
        self.check_trusted()  # before anything is made through a link
        for folder in (self.state_dir, self.jobs_dir, self.logs_dir):
            try:
                make_shared_dir(folder)
            except OSError as exc:
                raise LedgerError(
                    folder,
                    f"cannot create the state folder: {exc.strerror}; "
                    "set state_dir or $GPURUN_STATE_DIR to a writable folder",
                ) from None
            if not os.path.isdir(folder):
                raise LedgerError(
                    folder, "exists and is not a folder; set state_dir to a folder path"
                )
        # The lock `alloc` takes for reservation names across servers (reservations.py),
        # made with the folders so that a refused `alloc` leaves nothing new behind.
        try:
            create_shared_file(os.path.join(self.state_dir, NAMES_LOCK))
        except OSError:
            pass

    def check_trusted(self) -> None:
        """Refuse a state dir that another user could use to redirect gpurun's writes.

        The state dir is often in /tmp, where anyone may create a folder or a symbolic link
        under the name gpurun will use. So the state dir, `jobs/` and `logs/` must not be
        symbolic links, and the files in them are opened with O_NOFOLLOW. A state dir made by
        another user's first gpurun is accepted: it is 0777, so every user could rewrite what
        is in it anyway, and its owner has no power over it the others lack (the README's
        trust model). Checked once per Ledger, before its first change.
        """
        if self.checked:
            return
        for folder in (self.state_dir, self.jobs_dir, self.logs_dir):
            # lstat("link/") looks through the link: the name is judged without its slashes.
            folder = folder.rstrip("/") or "/"
            try:
                info = os.lstat(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise LedgerError(
                    folder, f"cannot look at the state folder: {exc.strerror}"
                ) from None
            if stat.S_ISLNK(info.st_mode):
                target = os.path.realpath(folder)
                raise LedgerError(
                    folder,
                    f"is a symbolic link (to {target}); gpurun refuses to follow one in the "
                    "state folder, where another user could point it anywhere; set state_dir "
                    "to the real folder, or remove the link",
                )
        self.checked = True

    def read(self) -> State:
        """Read the ledger without the lock (a consistent snapshot, thanks to rename)."""
        self.check_trusted()  # once: so `ps` refuses a linked state folder as a change does
        try:
            fd = open_shared(self.path)
        except FileNotFoundError:
            return State([], 1, 0.0)
        except OSError as exc:
            raise LedgerError(self.path, _open_problem(exc, "the ledger")) from None
        try:
            with open(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise LedgerError(self.path, f"cannot read the ledger: {exc.strerror}") from None
        return self._parse(data)

    def _parse(self, data: bytes) -> State:
        try:
            doc = codec.loads(data)
            version = doc.get("schema") if isinstance(doc, dict) else None
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError("it has no schema version")
            schema = doc["schema"]
            if schema > SCHEMA:
                raise LedgerError(
                    self.path,
                    f"was written by a newer gpurun (schema {schema}; this one reads up to "
                    f"{SCHEMA}); nothing was changed; upgrade gpurun on this host",
                )
            if schema < 1:
                raise ValueError(f"schema {schema} is not one gpurun ever wrote")
            leases = [Lease.from_json(r) for r in doc["leases"]]
            next_id = _int(doc["next_id"])
            heartbeat = _num(doc.get("heartbeat", 0.0))
            boot = doc.get("boot") if isinstance(doc.get("boot"), str) else ""
            inventory = None
            if isinstance(doc.get("gpus"), list) and isinstance(doc.get("cpus"), list):
                inventory = {
                    "gpus": [_int(i) for i in doc["gpus"]],
                    "cpus": [_int(i) for i in doc["cpus"]],
                }
        except LedgerError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise LedgerError(
                self.path,
                f"the ledger cannot be read ({str(exc)[:120]}); nothing was changed; run "
                "'gpurun reset' to move it aside and start a new one",
            ) from None
        state = State(leases, max(next_id, 1), heartbeat, boot, inventory)
        state.schema = schema
        return state

    def transaction(self, block: tuple[int, ...] = ()) -> Transaction:
        """`with ledger.transaction() as state:` read-modify-write under the lock.

        `block`: signals to block once the lock is taken (and leave blocked), so that the
        caller decides when they may interrupt it again.
        """
        return Transaction(self, block)

    def write(self, state: State) -> None:
        """Replace the ledger atomically; on failure the old file is left byte for byte."""
        if self.owner and not self.named and not os.path.exists(self.path):
            self._refuse_twin()
        tmp = self.write_temp(state)
        if _CRASH_AT:
            crash_at("before-rename")
        try:
            os.rename(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise LedgerError(
                self.path, f"cannot replace the ledger ({exc.strerror}); it was left as it was"
            ) from None
        if _CRASH_AT:
            crash_at("after-rename")
        if state.schema < SCHEMA:
            log.warning(
                "%s: upgraded the ledger from schema %d to %d (its old content is in the new "
                "one); a gpurun older than this one, on any host sharing it, now refuses it: "
                "upgrade those too",
                self.path,
                state.schema,
                SCHEMA,
            )
            state.schema = SCHEMA

    def write_temp(self, state: State) -> str:
        """Write the state to a temporary file beside the ledger, fsynced; return its path."""
        from gpurun.liveness import boot_id

        if self.owner:
            state.heartbeat = time.time()
            state.boot = boot_id()
            if self.inventory is not None:
                gpus, cpus = self.inventory
                state.inventory = {"gpus": list(gpus), "cpus": list(cpus)}
        header = {
            "schema": SCHEMA,
            "server": self.server,
            "boot": state.boot,
            "heartbeat": state.heartbeat,
            "next_id": state.next_id,
        }
        if state.inventory is not None:
            header.update(state.inventory)
        head = codec.dumps(header)
        lines = ",\n".join(codec.dumps(_ledger_record(lease)) for lease in state.leases)
        text = head[:-1] + ',"leases":[\n' + lines + "\n]}\n"
        return self._write_temp(self.path, text.encode())

    def _refuse_twin(self) -> None:
        """Refuse to start a second ledger for this machine under another name.

        gpurun names a server after its hostname, and a container or UTS namespace on the same
        machine may see another one; two ledgers would hand out the same GPUs twice. A ledger
        written since this boot (same boot id) under another name gives that away. A server
        named with $GPURUN_SERVER is taken at its word (tests simulate several hosts so).
        """
        from gpurun.liveness import boot_id

        me = boot_id()
        if not me:
            return
        try:
            names = [
                n
                for n in os.listdir(self.state_dir)
                if n.endswith(".json") and n != os.path.basename(self.path)
            ]
        except OSError:
            return
        for name in names:
            try:
                with open(open_shared(os.path.join(self.state_dir, name)), "rb") as f:
                    head = f.read(512)
            except OSError:
                continue  # not a ledger (a FIFO, a link, a folder): nothing to tell
            if f'"boot":"{me}"'.encode() in head:
                other = name[: -len(".json")]
                raise LedgerError(
                    self.path,
                    f"this machine already keeps its ledger here as '{other}' (same boot id) "
                    f"but calls itself '{self.server}' now (a container or another hostname?); "
                    f"set GPURUN_SERVER={other} so every gpurun on it shares one ledger",
                )

    def live_job_locks(self) -> list[int]:
        """Ids of this server's jobs whose job lock a live process still holds."""
        from gpurun.liveness import job_lock_held

        prefix = f"{self.server}."
        ids = []
        try:
            names = os.listdir(self.jobs_dir)
        except OSError:
            return ids
        for name in names:
            middle = name[len(prefix) : -len(".lock")]
            if (
                name.startswith(prefix)
                and name.endswith(".lock")
                and middle.isdigit()
                and job_lock_held(os.path.join(self.jobs_dir, name))
            ):
                ids.append(int(middle))
        return sorted(ids)

    def remove_leftovers(self, state: State) -> list[str]:
        """Delete what a gpurun killed halfway left behind; return the paths deleted.

        That is temporary files (`.NAME.PID.tmp`, `.NAME.PID.new`) in the state dir and
        `jobs/` whose pid is gone, so a write in progress (another server's, or a job lock
        being made) is never touched and a pid we cannot see counts as alive; and job locks
        of this server that no process holds and no lease in `state` names. None of them
        ever blocks anyone (each writer has its own name, a free job lock is replaced); this
        keeps the folder clean. Jobs' pid files go with their leases too. Call it under the
        ledger lock, with the state it read.
        """
        from gpurun.liveness import job_lock_held, process_start

        removed = []
        listed = {lease.id for lease in state.leases}
        prefix = f"{self.server}."
        try:
            names = os.listdir(self.jobs_dir)
        except OSError:
            names = []
        for name in names:
            middle, _, suffix = name[len(prefix) :].partition(".")
            if not (name.startswith(prefix) and suffix in ("lock", "pid") and middle.isdigit()):
                continue
            path = os.path.join(self.jobs_dir, name)
            if int(middle) in listed or (suffix == "lock" and job_lock_held(path)):
                continue
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        for folder in (self.state_dir, self.jobs_dir):
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            for name in names:
                parts = name.rsplit(".", 2)
                if not name.startswith(".") or len(parts) != 3 or parts[2] not in ("tmp", "new"):
                    continue
                if not parts[1].isdigit():
                    continue
                try:
                    if process_start(int(parts[1])) is not None:
                        continue
                except PermissionError:
                    continue
                path = os.path.join(folder, name)
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        os.rmdir(path)
                    else:
                        os.unlink(path)
                except OSError:
                    continue
                removed.append(path)
        return removed

    def _write_temp(self, path: str, data: bytes) -> str:
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        try:
            fd = create_afresh(tmp, os.O_WRONLY, 0o666)
            try:
                os.fchmod(fd, 0o666)
                view = memoryview(data)
                if _CRASH_AT and _CRASH_AT.startswith("temp-partial"):
                    view = view[os.write(fd, view[: len(view) // 2]) :]
                    crash_at("temp-partial")
                while view:
                    view = view[os.write(fd, view) :]
                if _CRASH_AT:
                    crash_at("temp-written")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise LedgerError(
                path,
                f"cannot write the ledger ({exc.strerror}); it was left "
                "as it was; free space or fix the state folder's "
                "permissions",
            ) from None
        return tmp

    def lock(self, path: str = "") -> int:
        """Take the ledger lock (or the lock file at `path` in the state dir, such as the
        lock of reservation names, NAMES_LOCK), waiting up to lock_timeout; return the
        descriptor to unlock.

        A busy lock is waited for in flock(2) itself, so the kernel hands it over the moment
        it is let go; polling left it idle between tries, which made a crowd of launches take
        longer than the same launches one after another. A timer (SIGALRM) bounds the wait;
        Ctrl-C still ends it.
        """
        self.check_trusted()
        path = path or self.lock_path
        fd = self._open_lock_file(path)
        began = time.monotonic()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._wait_for_lock(fd)
        except LockTimeout:
            holder = _lock_holder(fd)
            os.close(fd)
            raise LedgerError(
                path,
                f"still locked after lock_timeout ({self.lock_timeout:g} s){holder}; "
                "if that process is stuck, end it or raise lock_timeout",
            ) from None
        except OSError as exc:
            os.close(fd)
            raise LedgerError(path, f"cannot lock: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        log.debug("took %s after %.1f ms", path, (time.monotonic() - began) * 1000)
        return fd

    def _wait_for_lock(self, fd: int) -> None:
        """Block in flock(2) until the lock is ours; raise LockTimeout after lock_timeout."""

        def expire(signum: int, frame: object) -> None:
            raise LockTimeout

        from gpurun import signals

        previous = signals.signal(signals.SIGALRM, expire)
        try:
            signals.setitimer(signals.ITIMER_REAL, self.lock_timeout)
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            signals.setitimer(signals.ITIMER_REAL, 0)
            signals.signal(signals.SIGALRM, previous)

    def _open_lock_file(self, path: str) -> int:
        # O_NONBLOCK: a FIFO put in its place would hold the open, and every gpurun behind it
        # (flock waits as ever; the flag only changes reads and writes, which a lock has none).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        for _ in range(3):
            try:
                return os.open(path, flags)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise LedgerError(path, _open_problem(exc, "the lock")) from None
            try:
                create_shared_file(path)
            except FileNotFoundError:
                self.ensure_dirs()
            except OSError as exc:
                raise LedgerError(
                    path,
                    f"cannot create the lock: {exc.strerror}; check the state folder's permissions",
                ) from None
        raise LedgerError(
            path,
            "the lock file keeps vanishing; is something deleting files in the state folder?",
        )

    def append_history(self, records: list[dict[str, object]]) -> None:
        """Append finished jobs to the history file in one write."""
        if not records:
            return
        data = "".join(codec.dumps(r) + "\n" for r in records).encode()
        try:
            if not os.path.exists(self.history_path):
                create_shared_file(self.history_path)
            fd = open_shared(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            log.warning("cannot append to %s: %s", self.history_path, exc.strerror)
            return
        try:
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and info.st_mode & 0o777 != 0o666:
                os.fchmod(fd, 0o666)
            os.write(fd, data)
        except OSError as exc:
            log.warning("cannot append to %s: %s", self.history_path, exc.strerror)
        finally:
            os.close(fd)

    def read_history(self) -> list[dict[str, object]]:
        """All finished jobs, oldest first; a torn or foreign line is skipped."""
        try:
            with open(open_shared(self.history_path), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(self.history_path, f"cannot read: {exc.strerror}") from None
        records = []
        for line in data.splitlines():
            try:
                record = codec.loads(line)
            except (ValueError, RecursionError):
                log.debug("skipping a torn history line in %s", self.history_path)
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def finished_jobs(self, ids: set[int]) -> dict[int, dict[str, object]]:
        """The history records of these job ids, read from the end of the file backwards."""
        wanted = set(ids)
        found: dict[int, dict[str, object]] = {}
        try:
            f = open(open_shared(self.history_path), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise LedgerError(self.history_path, f"cannot read: {exc.strerror}") from None
        with f:
            position = f.seek(0, os.SEEK_END)
            carry = b""
            while position > 0 and wanted:
                step = min(65536, position)
                position -= step
                f.seek(position)
                lines = (f.read(step) + carry).split(b"\n")
                carry = lines.pop(0) if position > 0 else b""
                for line in reversed(lines):
                    record = _history_line(line, wanted)
                    if record is not None:
                        found[record["id"]] = record
                        wanted.discard(record["id"])
        return found

    def last_history_id(self) -> int:
        """The highest job id among the last history lines (0 when there are none)."""
        try:
            with open(open_shared(self.history_path), "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 65536))
                tail = f.read()
        except OSError:
            return 0
        best = 0
        for line in tail.splitlines():
            try:
                value = codec.loads(line).get("id")
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(value, int):
                best = max(best, value)
        return best

    def move_aside(self) -> str | None:
        """Rename the ledger to a timestamped name beside it; return that name (None if absent)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = f"{self.path}.{stamp}.bak"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(self.path, f"cannot move the ledger aside: {exc.strerror}") from None
        return aside


def _open_problem(exc: OSError, what: str) -> str:
    """Why `what` in the state dir cannot be opened, and what to do about it."""
    if exc.errno == errno.ELOOP:
        return (
            f"{what} is a symbolic link; gpurun never follows one in the state folder, where "
            "another user could point it at any file; remove the link ('gpurun reset' moves "
            "a ledger aside)"
        )
    if exc.errno == errno.EINVAL:
        return (
            f"{what} is not a regular file (a FIFO or device in its place?); remove it "
            "('gpurun reset' moves a ledger aside)"
        )
    return f"cannot open {what}: {exc.strerror}; check the state folder's permissions"


def crash_at(point: str) -> None:
    """Die by SIGKILL here if GPURUN_CRASH_AT names this point and count (see CRASH_POINTS)."""
    name, _, count = _CRASH_AT.partition(":")
    if point != name:
        return
    _crash_count[0] += 1
    if _crash_count[0] >= (int(count) if count.isdigit() else 1):
        from gpurun import signals

        os.kill(os.getpid(), signals.SIGKILL)


def open_shared(path: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """Open a file of the state folder, where every user may make files, so that what
    someone put there cannot hang or fool gpurun: no symbolic link is followed, and the open
    never waits, as it would on a FIFO, for every gpurun behind the ledger lock. Raises
    OSError, also for anything but a regular file. For reading and writing, not for locks."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_afresh(path: str, flags: int, mode: int) -> int:
    """Create `path` as a new file of ours, removing whatever was there: a temporary name of
    this process is ours alone, so anything found there is a crash's leftover or was put
    there to be written through (a FIFO, a file another user can read). Raises OSError; a
    name someone keeps making again (EBUSY) is not mistaken for one that exists (EEXIST)."""
    for _ in range(5):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            return os.open(
                path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
            )
        except FileExistsError:
            continue  # made again between the unlink and the open
    raise OSError(errno.EBUSY, "something keeps making this name again", path)


def create_shared_file(path: str) -> None:
    """Create an empty file that every user may open for reading and writing (mode 0666).

    The file is made under a temporary name, given its mode, and only then linked into place,
    so a gpurun killed halfway never leaves a file other users cannot open. An existing file
    is left as it is.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.new")
    fd = create_afresh(tmp, os.O_WRONLY, 0o666)
    try:
        os.fchmod(fd, 0o666)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def make_shared_dir(path: str) -> None:
    """Create a folder every user may write (0777, not sticky), with the same care: made under
    a temporary name, given its mode, then renamed into place. Parents gpurun has to create
    are made 0755, so other users can reach it whatever our umask."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        make_parents(parent)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.new")
    os.mkdir(tmp, 0o700)
    try:
        os.chmod(tmp, 0o777)
        os.rename(tmp, path)
    except OSError:
        try:
            os.rmdir(tmp)
        except OSError:
            pass
        if not os.path.exists(path):
            raise


def make_parents(path: str) -> None:
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o755)
            os.chmod(folder, 0o755)
        except FileExistsError:
            pass


def _history_line(line: bytes, wanted: set[int]) -> dict[str, object] | None:
    """Parse a history line only if its id (written first) is one of `wanted`."""
    if not line.startswith(b'{"id":'):
        return None
    head = line[6 : line.find(b",", 6)]
    if not head.isdigit() or int(head) not in wanted:
        return None
    try:
        record = codec.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


class Transaction:
    """Holds the ledger lock; on a clean exit writes the state if it changed."""

    __slots__ = ("block", "fd", "ledger", "state")

    def __init__(self, ledger: Ledger, block: tuple[int, ...] = ()) -> None:
        self.ledger = ledger
        self.block = block
        self.fd = -1
        self.state: State | None = None

    def __enter__(self) -> State:
        self.fd = self.ledger.lock()
        if _CRASH_AT:
            crash_at("locked")
        if self.block:
            # Taken only once the lock is held, so Ctrl-C still ends a wait for the lock.
            from gpurun import signals

            signals.pthread_sigmask(signals.SIG_BLOCK, self.block)
        try:
            self.state = self.ledger.read()
        except BaseException:
            os.close(self.fd)
            raise
        return self.state

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        written = False
        try:
            if kind is None and self.state is not None:
                if self.state.finished:
                    self.ledger.append_history(self.state.finished)
                if self.state.changed:
                    self.ledger.write(self.state)
                    written = True
        finally:
            os.close(self.fd)
        if written:
            self.ledger.ring_after(self.state)


def _lock_holder(fd: int) -> str:
    """Describe the process holding the flock on `fd`'s file, from /proc/locks, if visible."""
    try:
        info = os.fstat(fd)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        device_inode = parts[5].split(":")
        if (
            len(device_inode) == 3
            and device_inode[2].isdigit()
            and int(device_inode[2]) == info.st_ino
        ):
            pid = parts[4]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = ""
            return f"; held by pid {pid}" + (f" ({cmd[:60]})" if cmd else "")
    return ""


class Watcher:
    """Wakes a waiting gpurun when something it waits for happens (inotify(7)).

    Without `files`, it watches the state dir and `jobs/` for renames (a ledger replaced) and
    attribute changes (Ledger.ring touching a job lock or the ledger lock). With `files`, it
    watches only those files' attribute changes: a waiting gpurun wants its own job lock (its
    lease was placed) and the ledger lock (a lease left with no one placing what it let
    start). Watching the files, not their folders, keeps the writes that matter only to
    others from waking it at all: every ledger write renames one file in the state dir and
    sets a temporary file's mode there, and in a crowd of 100 launches each waiting gpurun
    was woken by each of those writes, only to find nothing for it. Without inotify it simply
    sleeps; the poll interval bounds the wait either way, which also catches leases whose
    processes died without anyone rewriting the ledger.
    """

    IN_ATTRIB = 0x4
    IN_MOVED_TO = 0x80

    def __init__(self, folder: str, files: tuple[str, ...] = ()) -> None:
        from gpurun import libc

        self.fd = -1
        if files:
            targets, mask = files, self.IN_ATTRIB
        else:
            targets, mask = (
                (folder, os.path.join(folder, "jobs")),
                self.IN_MOVED_TO | self.IN_ATTRIB,
            )
        try:
            fd = libc.call("inotify_init1", os.O_NONBLOCK | os.O_CLOEXEC)
            watched = (libc.call("inotify_add_watch", fd, os.fsencode(t), mask) for t in targets)
            if fd >= 0 and all(wd >= 0 for wd in watched):
                self.fd = fd
            elif fd >= 0:
                os.close(fd)
        except OSError:
            self.fd = -1

    def wait(self, seconds: float) -> None:
        """Return when a watched event came, or after `seconds`."""
        if self.fd < 0:
            time.sleep(seconds)
            return
        import select

        ready, _, _ = select.select([self.fd], [], [], max(0.0, seconds))
        if ready:
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                pass

    def close(self) -> None:
        """Close the inotify instance. That waits for the kernel to retire its watches (an
        RCU grace period: 0 to 20 ms measured), so a gpurun whose job is placed does not
        close it before starting the command; the kernel closes it at exit, after the lease
        is freed and the next job woken."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_ledger(config: Config, server: str | None = None) -> Ledger:
    """This host's ledger, or another server's (whose job leases this host cannot judge)."""
    if server is None or server == config.server:
        return Ledger(
            config.state_dir,
            config.server,
            config.lock_timeout,
            config.server_named,
            owner=True,
            inventory=(config.gpus, config.cpus),
        )
    return Ledger(config.state_dir, server, config.lock_timeout, named=True, owner=False)
