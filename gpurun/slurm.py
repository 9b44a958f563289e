"""Slurm: run inside an allocation, or hand jobs to Slurm itself (`backend: slurm`).

Inside an allocation (`SLURM_JOB_ID` is set) gpurun's inventory is what the allocation holds:
the GPUs in the inherited `CUDA_VISIBLE_DEVICES` (else `SLURM_STEP_GPUS`/`SLURM_JOB_GPUS`) and
the CPUs this process may run on, with a ledger private to the job and step, so runs in
different allocations never see each other.

As the backend, gpurun runs nothing itself: the foreground run is `srun`, a detached one is
`sbatch`, `ps` reads `squeue`, `kill` is `scancel` and `logs` reads the job's output file.
Nothing of this module is imported on a local run. A foreground run imports no `subprocess`,
`shlex`, `shutil`, `contextlib` or `threading` (with what they pull in, `re`, `collections`,
`enum` and more, they were about 10 ms of each Slurm launch): Slurm's client commands are run
with `subprocess` only when gpurun needs their answer.
"""

from __future__ import annotations

import _thread
import os
import sys
import time

from gpurun import signals
from gpurun.config import Config
from gpurun.errors import (
    BusyError,
    CommandError,
    ConfigError,
    Interrupted,
    NotFoundError,
    SlurmError,
    UsageError,
)
from gpurun.log import get_logger

log = get_logger(__name__)

PRIVATE_PREFIX = "gpurun-slurm-"
# srun and sbatch exit with this on their own errors (srun(1), SLURM_EXIT_ERROR), so a failure
# of Slurm is told apart from the command's exit code 1.
SLURM_EXIT_ERROR = 125
# ... and with this when --immediate ran out (srun(1), SLURM_EXIT_IMMEDIATE): gpurun's "busy".
SLURM_EXIT_IMMEDIATE = 75
# What srun and slurmstepd write on stderr about the step; gpurun keeps these off the user's
# stderr and speaks for them in its own words.
SLURM_LINES = (b"srun: ", b"slurmstepd: ", b"slurmstepd-")
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED")
SQUEUE_FORMAT = "%i|%j|%u|%N|%T|%r|%S|%V|%b|%C|%k"
COMMENT_PREFIX = "gpurun["


# Inside an allocation.


def inside_allocation(config: Config) -> Config:
    """The config with the allocation's GPUs and CPUs and a ledger private to it.

    The private state dir is `SLURM_TMPDIR`, else `TMPDIR`, else the state dir, joined with
    `gpurun-slurm-JOB[.STEP]`. gpurun cannot run when the allocation ends, so it cannot remove
    that folder then: under `SLURM_TMPDIR` the site's epilog removes it with the rest; elsewhere
    the first gpurun of each new allocation removes the folders of this user's Slurm jobs that
    `squeue` no longer lists (keeping all of them when squeue cannot answer).
    """
    job = os.environ["SLURM_JOB_ID"]
    step = os.environ.get("SLURM_STEP_ID", "")
    if not job.isascii() or not job.isdigit():
        raise ConfigError("$SLURM_JOB_ID", f"'{job}' is not a Slurm job id")
    if config.gpu_mask is not None and not config.mask_note:
        # The inherited CUDA_VISIBLE_DEVICES named GPUs this server has (by index or UUID):
        # the allocation is those, exported back in the same form (masks.py).
        gpus = tuple(g for g in config.gpus if g in config.gpu_mask)
        mask = gpus
    else:
        gpus = allocation_gpus(os.environ)
        mask = None
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    base = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or config.state_dir
    name = PRIVATE_PREFIX + job + (f".{step}" if step.isascii() and step.isdigit() else "")
    state_dir = os.path.join(os.path.abspath(base), name)
    if not os.path.isdir(state_dir):
        if "SLURM_TMPDIR" not in os.environ:
            remove_ended(os.path.dirname(state_dir), job)
        try:
            os.makedirs(state_dir, mode=0o700)
        except FileExistsError:
            pass
    log.debug("inside Slurm job %s: GPUs %s, private state dir %s", job, gpus, state_dir)
    return config._replace(
        state_dir=state_dir,
        server=name,
        server_named=True,
        gpus=gpus,
        gpu_mask=mask,
        cpus=cpus,
        cpus_per_gpu=max(1, len(cpus) // len(gpus)) if gpus and cpus else 0,
        servers=(),
        entry=None,
        chosen_by=f"inside Slurm job {job}: the allocation's GPUs and CPUs"
        + (
            ""
            if gpus or any(key in os.environ for key in GPU_VARIABLES)
            else " (Slurm set none of CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS, SLURM_JOB_GPUS "
            "here, so no GPUs: a bare salloc shell? run gpurun in 'srun --pty bash')"
        ),
    )


# Where an allocation's GPUs are read from, first found wins.
GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def allocation_gpus(env: dict[str, str] | os._Environ) -> tuple[int, ...]:
    """The allocation's GPU indices, in the form the job should export them.

    `CUDA_VISIBLE_DEVICES` wins, since it is what CUDA in this process would see and what a
    job must be given back (empty means no GPUs); Slurm's own lists count only without it.
    """
    for key in GPU_VARIABLES:
        value = env.get(key)
        if value is None:
            continue
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise ConfigError(
                f"${key}",
                f"holds '{value}'; inside a Slurm allocation gpurun reads GPU indices such as "
                "0,1 (ask your admin to drop AutoDetect UUID names, or unset it)",
            )
        ids = [int(part) for part in parts]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"${key}", f"lists a GPU twice: '{value}'")
        return tuple(ids)
    return ()


def remove_ended(base: str, current: str) -> None:
    """Remove this user's private folders of Slurm jobs that squeue no longer lists."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(PRIVATE_PREFIX)]
    except OSError:
        return
    uid = os.getuid()
    mine = {}
    for name in names:
        job = name[len(PRIVATE_PREFIX) :].split(".")[0]
        path = os.path.join(base, name)
        try:
            if job != current and os.stat(path).st_uid == uid:
                mine[path] = job
        except OSError:
            pass
    if not mine:
        return
    try:
        listed = _slurm(["squeue", "-h", "--me", "-o", "%A"], timeout=10).split()
    except SlurmError as exc:
        log.debug("kept the private folders of ended jobs: %s", exc)
        return
    import shutil

    for path, job in mine.items():
        if job not in listed:
            log.info("removing %s: Slurm job %s has ended", path, job)
            shutil.rmtree(path, ignore_errors=True)


# Slurm as the backend.


def job_options(
    gpus: int,
    cpus: int | None,
    name: str,
    time_limit: float | None,
    after: tuple[int, ...],
    after_any: bool,
    config: Config,
    comment: str,
) -> list[str]:
    """The srun/sbatch options for a gpurun request; `comment` is from `job_comment`."""
    options = [f"--job-name={name}", "--ntasks=1", f"--comment={comment}"]
    if gpus:
        options.append(f"--gres=gpu:{gpus}")
    if cpus:
        options.append(f"--cpus-per-task={cpus}")
    if time_limit is not None:
        options.append(f"--time={slurm_time(time_limit)}")
    if after:
        kind = "afterany" if after_any else "afterok"
        options.append(f"--dependency={kind}:" + ":".join(map(str, after)))
    if config.slurm_partition:
        options.append(f"--partition={config.slurm_partition}")
    if config.slurm_account:
        options.append(f"--account={config.slurm_account}")
    return options


def slurm_time(seconds: float) -> str:
    """A time limit as Slurm writes it, D-HH:MM:SS; Slurm rounds it up to whole minutes."""
    whole = max(1, int(-(-seconds // 1)))
    days, rest = divmod(whole, 86400)
    return f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def job_environment(cpus: int | None) -> dict[str, str]:
    """What srun and sbatch pass on (all of it, Slurm's default), with gpurun's additions."""
    env = dict(
        os.environ,
        SLURM_EXIT_ERROR=str(SLURM_EXIT_ERROR),
        SLURM_EXIT_IMMEDIATE=str(SLURM_EXIT_IMMEDIATE),
    )
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(cpus)
    return env


def submit(options: list[str], command: list[str], cpus: int | None) -> str:
    """Queue the command with sbatch; return the Slurm job id."""
    argv = ["sbatch", "--parsable", *options, f"--wrap={shell_join(command)}"]
    out = _slurm(argv, env=job_environment(cpus), timeout=60)
    job = out.strip().split(";")[0]
    if not job.isdigit():
        raise SlurmError("sbatch", f"answered '{out.strip()}' instead of a job id")
    return job


def run_foreground(
    options: list[str], command: list[str], cpus: int | None, wait: float | None, comment: str
) -> int:
    """Run the command through srun in the foreground; return its exit status.

    srun exits with the command's code, or 128+N when a signal ended it. Signals sent to
    gpurun reach the command as they would locally: srun itself answers SIGTERM, SIGHUP and
    SIGQUIT by killing the step with SIGKILL, so once the step runs gpurun passes them on with
    `scancel --signal`, found by its comment; before that (still queued) they end srun, which
    withdraws the request. `wait` is --no-wait (0) or --timeout: srun --immediate.
    """
    argv = ["srun", "--kill-on-bad-exit=1", *options]
    if wait is not None:
        argv.append(f"--immediate={max(1, int(-(-wait // 1)))}")
    argv.extend(["--", *command])
    from gpurun.supervise import resolve_command

    try:
        srun = resolve_command("srun")
    except CommandError:
        raise SlurmError("srun", "not found on PATH; is Slurm installed here?") from None

    read_end, write_end = os.pipe()
    from gpurun.supervise import BLOCKED as forwarded  # the signals gpurun passes on, SIGCHLD

    signals.pthread_sigmask(signals.SIG_BLOCK, forwarded)
    try:
        pid = os.posix_spawn(
            srun,
            argv,
            job_environment(cpus),
            file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 2)],
            setsigmask=(),
        )
    except OSError as exc:  # a script whose interpreter is missing, say
        signals.pthread_sigmask(signals.SIG_UNBLOCK, forwarded)
        os.close(read_end)
        raise SlurmError(srun, f"cannot start it: {exc.strerror}") from None
    finally:
        os.close(write_end)
    relay = _StderrRelay(read_end)
    relay.start()
    status = None
    withdrawn = 0
    while status is None:
        info = signals.sigwaitinfo(forwarded)
        if info.si_signo == signals.SIGCHLD:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            continue
        if not _pass_on(pid, comment, info.si_signo):
            withdrawn = withdrawn or info.si_signo
    relay.join()
    signals.pthread_sigmask(signals.SIG_UNBLOCK, forwarded)

    code = os.waitstatus_to_exitcode(status)
    if withdrawn and code in (SLURM_EXIT_ERROR, 128 + withdrawn, 1):
        raise Interrupted(withdrawn)
    if code < 0:
        return 128 - code
    immediate = code == SLURM_EXIT_IMMEDIATE or "Immediate" in " ".join(relay.errors)
    if immediate and wait is not None and code in (SLURM_EXIT_IMMEDIATE, SLURM_EXIT_ERROR):
        how = "--no-wait" if wait == 0 else f"gave up after --timeout {wait:g} s"
        raise BusyError(f"Slurm could not start the job: {'; '.join(relay.errors)}; {how}")
    if code == SLURM_EXIT_ERROR and relay.errors:
        raise SlurmError("srun", "; ".join(relay.errors))
    if relay.cancelled and code in (0, 137):
        say("the Slurm job was cancelled (scancel, or it ran past --time)")
    return code


def _pass_on(srun: int, comment: str, signum: int) -> bool:
    """Deliver a signal gpurun got to the command: through scancel once the step runs (then
    return True); before that, to srun, which gives up waiting for resources."""
    job = None
    try:
        for line in _slurm(["squeue", "-h", "--me", "-o", "%A|%T|%k"], timeout=10).splitlines():
            fields = line.split("|", 2)
            if len(fields) == 3 and fields[2] == comment and fields[1] == "RUNNING":
                job = fields[0]
    except SlurmError:
        pass
    if job is not None:
        name = signals.name(signum).removeprefix("SIG")
        try:
            _slurm(["scancel", f"--signal={name}", job], timeout=10)
            return True
        except SlurmError:
            pass
    try:
        os.kill(srun, signum)
    except ProcessLookupError:
        pass
    return False


class _StderrRelay:
    """Copy srun's stderr to ours as it comes, keeping back srun's and slurmstepd's own lines
    and remembering its errors, in a thread of its own. The thread is started with _thread,
    as threading.Thread would start it: importing threading, with the functools and
    collections it imports, was 3 ms of each Slurm launch."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.errors: list[str] = []
        self.cancelled = False
        self._done = _thread.allocate_lock()

    def start(self) -> None:
        self._done.acquire()
        _thread.start_new_thread(self._run, ())

    def join(self) -> None:
        """Wait until srun's stderr is closed and all of it is copied."""
        with self._done:
            pass

    def _run(self) -> None:
        try:
            self.run()
        finally:
            self._done.release()

    def run(self) -> None:
        pending = b""
        out = sys.stderr.buffer
        with open(self.fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                pending = self._pass(pending, out)
        if pending:
            self._pass(pending + b"\n", out)

    def _pass(self, data: bytes, out: object) -> bytes:
        """Write what can be written now; return what waits for the rest of its line."""
        shown = []
        while data:
            line, newline, rest = data.partition(b"\n")
            ours = any(line.startswith(p) or p.startswith(line) for p in SLURM_LINES)
            if ours and not newline:
                break
            if ours and any(line.startswith(p) for p in SLURM_LINES):
                self._note(line.decode(errors="replace"))
            else:
                shown.append(line + newline)
            data = rest
        if shown:
            out.write(b"".join(shown))
            out.flush()
        return data

    def _note(self, line: str) -> None:
        log.debug("%s", line)
        if "CANCELLED" in line:
            self.cancelled = True
        if line.startswith("srun: error: ") and ": task " not in line:
            problem = line.removeprefix("srun: error: ")
            problem = problem.removeprefix("Unable to allocate resources: ")
            if problem not in self.errors:
                self.errors.append(problem)
        elif line.startswith("srun: job ") and "queued and waiting" in line:
            say(f"Slurm {line.removeprefix('srun: ')}; 'squeue --me' says why")


def say(text: str) -> None:
    """One `gpurun: ` line on stderr about the Slurm job (not an error)."""
    try:
        sys.stderr.write(f"gpurun: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def list_jobs(include_finished: bool = False) -> list[dict[str, object]]:
    """This user's Slurm jobs as `ps --json` shows local ones, from `squeue --json` (or a
    fixed --format where this Slurm has no JSON)."""
    try:
        jobs = _squeue_json()
    except _NoJson:
        jobs = _squeue_format()
    rows = []
    now = time.time()
    for job in jobs:
        if not include_finished and job["slurm_state"] not in LIVE_STATES:
            continue
        rows.append(_row(job, now))
    return sorted(rows, key=lambda row: row["id"])


class _NoJson(Exception):
    pass


def _squeue_json() -> list[dict[str, object]]:
    import json

    try:
        out = _slurm(["squeue", "--me", "--json"], timeout=30)
    except SlurmError as exc:
        if "json" in exc.reason.lower() or "unrecognized option" in exc.reason:
            raise _NoJson from None
        raise
    try:
        data = json.loads(out)
    except ValueError:
        raise _NoJson from None
    jobs = []
    for job in data.get("jobs", []):
        state = job.get("job_state")
        jobs.append(
            {
                "id": job.get("job_id"),
                "name": job.get("name"),
                "user": job.get("user_name"),
                "nodes": job.get("nodes") or None,
                "slurm_state": state[0] if isinstance(state, list) else state,
                "reason": job.get("state_reason"),
                "start": job.get("start_time") or None,
                "submit": job.get("submit_time") or None,
                "gres": ",".join(job.get("gres_detail") or []),
                "cpus": job.get("cpus"),
                "comment": job.get("comment") or "",
                "exit_code": exit_code(job.get("exit_code")),
                "command": job.get("command") or "",
            }
        )
    return jobs


def _squeue_format() -> list[dict[str, object]]:
    """Older Slurm: the same facts from a fixed format (times in local ISO 8601)."""
    from datetime import datetime

    def stamp(text: str) -> float | None:
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            return None

    out = _slurm(["squeue", "--me", "-h", "-o", SQUEUE_FORMAT], timeout=30)
    jobs = []
    for line in out.splitlines():
        fields = line.split("|", 10)
        if len(fields) != 11 or not fields[0].isdigit():
            continue
        job, name, user, nodes, state, reason, start, submit, gres, cpus, comment = fields
        jobs.append(
            {
                "id": int(job),
                "name": name,
                "user": user,
                "nodes": nodes or None,
                "slurm_state": state,
                "reason": reason,
                "start": stamp(start),
                "submit": stamp(submit),
                "gres": "" if gres in ("N/A", "(null)") else gres,
                "cpus": int(cpus) if cpus.isdigit() else None,
                "comment": "" if comment == "(null)" else comment,
                "exit_code": None,
                "command": "",
            }
        )
    return jobs


def exit_code(value: object) -> int | None:
    """What gpurun would have exited with, from squeue's `exit_code`: a wait(2) status in
    Slurm 22.05 (3 << 8 for exit 3, the signal number in the low bits), an object with
    `return_code` and `signal` in newer ones."""
    if isinstance(value, dict):
        signal_part = value.get("signal")
        number = signal_part.get("id") if isinstance(signal_part, dict) else None
        if isinstance(number, int) and number > 0:
            return 128 + number
        code = value.get("return_code")
        return code if isinstance(code, int) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    if value & 0x7F:
        return 128 + (value & 0x7F)
    return value >> 8


def gpu_indices(gres: str) -> list[int]:
    """GPU indices from Slurm's 'gpu:2(IDX:0-1)' or 'gpu:a100:3(IDX:0,2-3)'."""
    from gpurun.cpulist import parse_cpulist

    ids: list[int] = []
    for part in gres.split("),"):
        if "(IDX:" in part and part.startswith("gpu"):
            try:
                ids.extend(parse_cpulist(part.split("(IDX:", 1)[1].rstrip(")")))
            except ValueError:
                pass
    return ids


STATES = {"PENDING": "waiting", "RUNNING": "running"}
ENDED = {"COMPLETED": "exited", "FAILED": "exited", "CANCELLED": "cancelled", "TIMEOUT": "expired"}


def _row(job: dict[str, object], now: float) -> dict[str, object]:
    from gpurun.jobs import iso_time

    slurm_state = str(job["slurm_state"])
    state = STATES.get(slurm_state) or ENDED.get(slurm_state) or slurm_state.lower()
    started = job["start"] if slurm_state != "PENDING" else None
    since = started or job["submit"]
    comment = str(job["comment"])
    if comment.startswith(COMMENT_PREFIX) and "]: " in comment:
        try:
            import shlex

            command = shlex.split(comment.split("]: ", 1)[1])
        except ValueError:
            command = [comment.split("]: ", 1)[1]]
    else:
        command = [str(job["command"])] if job["command"] else []
    row = {
        "id": job["id"],
        "name": job["name"],
        "user": job["user"],
        "host": job["nodes"],
        "pid": None,
        "gpus": gpu_indices(str(job["gres"])),
        "cpus": [],
        "cpu_count": job["cpus"],
        "state": state,
        "kind": "slurm",
        "backend": "slurm",
        "started": iso_time(since) if isinstance(since, (int, float)) else None,
        "elapsed": round(now - since, 3) if isinstance(since, (int, float)) else None,
        "command": command,
        "request": {"gpus": len(gpu_indices(str(job["gres"]))), "cpus": job["cpus"]},
        "priority": 0,
        "time_limit": None,
        "after": [],
        "log": None,
        "slurm_state": slurm_state,
    }
    if slurm_state == "PENDING" and job["reason"] not in (None, "None"):
        row["reason"] = job["reason"]
    if state in ENDED.values():
        row["exit_code"] = job["exit_code"]
    return row


def job_id(ref: str) -> str:
    """A Slurm job id from '123' or 'slurm:123'."""
    text = ref.removeprefix("slurm:")
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise UsageError(f"'{ref}' is not a Slurm job id (a number such as 123)")
    return text


def kill_job(ref: str, signum: int) -> dict[str, object]:
    """scancel the job (with --signal for anything but TERM); return what was sent."""
    job = job_id(ref)
    argv = ["scancel", job]
    if signum != signals.SIGTERM:
        argv.insert(1, f"--signal={signals.name(signum).removeprefix('SIG')}")
    _known(job)
    _slurm(argv, timeout=30)
    return {"id": int(job), "backend": "slurm", "signals": [signals.name(signum)], "name": None}


def _known(job: str) -> None:
    """Refuse a job Slurm does not know, or one that has already ended, as a local kill does."""
    try:
        shown = _slurm(["scontrol", "show", "job", "-o", job], timeout=30)
    except SlurmError as exc:
        if "invalid job id" in exc.reason.lower():
            raise NotFoundError(f"Slurm knows no job {job}; 'gpurun ps' lists yours") from None
        raise
    state = next((word[9:] for word in shown.split() if word.startswith("JobState=")), "")
    if state and state not in ("PENDING", "RUNNING", "SUSPENDED", "CONFIGURING", "REQUEUED"):
        raise NotFoundError(f"Slurm job {job} has already ended ({state.lower()})")


def log_path(ref: str) -> str:
    """The job's output file: Slurm's StdOut while it knows the job, else ./slurm-ID.out."""
    job = job_id(ref)
    try:
        out = _slurm(["scontrol", "show", "job", "-o", job], timeout=30)
    except SlurmError as exc:
        if "invalid job id" not in exc.reason.lower():
            raise
        return os.path.abspath(f"slurm-{job}.out")
    for word in out.split():
        if word.startswith("StdOut="):
            return word.removeprefix("StdOut=")
    raise NotFoundError(f"Slurm job {job} ran in the foreground (srun); it has no output file")


def show_log(ref: str, follow: bool = False) -> int:
    """Copy the job's output file to stdout; with `follow`, until Slurm says it ended."""
    path = log_path(ref)
    job = job_id(ref)
    from gpurun.jobs import copy_output

    try:
        copy_output(path, lambda: follow and _still_running(job), 0.5)
        return 0
    except FileNotFoundError:
        raise NotFoundError(
            f"the output of Slurm job {job} ({path}) is not there (yet); a pending job "
            "has none, and Slurm writes it on the node that runs it"
        ) from None


def _still_running(job: str) -> bool:
    try:
        out = _slurm(["squeue", "-h", "-j", job, "-o", "%T"], timeout=30)
    except SlurmError:
        return False
    return out.strip() in LIVE_STATES


def job_comment(command: list[str]) -> str:
    """The job's Slurm comment: a mark unique to this gpurun (for passing signals on to its
    job) and the command, which squeue's JSON does not show for a --wrap job."""
    # One line: squeue prints comments one per line, and a newline would hide the mark.
    text = shell_join(command).replace("\n", "\\n")
    return f"{COMMENT_PREFIX}{os.getpid()}.{time.monotonic_ns()}]: {text}"


# The characters shlex.quote leaves unquoted (its pattern [^\w@%+=:,./-], in ASCII).
_UNQUOTED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")


def shell_join(words: list[str]) -> str:
    """The words as one shell command line, quoted as shlex.join quotes them (tests compare
    the two); shlex itself is not imported, for the `re` it pulls into each Slurm launch."""
    return " ".join(
        word if word and _UNQUOTED.issuperset(word) else "'" + word.replace("'", "'\"'\"'") + "'"
        for word in words
    )


def _slurm(argv: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> str:
    """Run a Slurm client command; return its stdout or raise SlurmError with its reason."""
    import subprocess

    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise SlurmError(argv[0], "not found on PATH; is Slurm installed here?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(argv[0], f"gave no answer within {timeout:g} s") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reasons = [_reason(line, argv[0]) for line in lines] or [f"exit {result.returncode}"]
        raise SlurmError(argv[0], "; ".join(dict.fromkeys(reasons)))
    return result.stdout


def _reason(line: str, program: str) -> str:
    for prefix in (f"{program}: error: ", f"{program}: "):
        line = line.removeprefix(prefix)
    return line.removeprefix("Batch job submission failed: ")
