"""The `gpurun` command line: parse, call one command, print, pick the exit code.

`main(argv)` is the only place that prints errors and chooses exit codes. The run path imports
the other commands' modules only when they are used, and parses its usual command lines
without argparse (see `quick_args`).
"""

from __future__ import annotations

import os
import sys

from gpurun import __version__
from gpurun.errors import (
    BusyError,
    CommandError,
    GpurunError,
    Interrupted,
    NotFoundError,
    UsageError,
)

# Only for annotations: argparse is imported when a parser is built.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

COMMANDS = (
    "run",
    "ps",
    "gc",
    "status",
    "kill",
    "reset",
    "logs",
    "wait",
    "alloc",
    "release",
    "doctor",
)
# Commands whose --server says which server this host is; the others act on the one named.
AS_SERVER = ("run", "ps", "gc", "kill", "logs", "wait", "doctor")

EXIT_USAGE = 2
EXIT_BUSY = 75
EXIT_FAILURE = 125
EXIT_INTERRUPTED = 130

USAGE = """\
usage: gpurun [run] [-g N] [-c N] [--gpu-ids IDS] [-n NAME] [--no-wait] [--timeout S]
                    [-d] [--time LIMIT] [--priority N] [--after IDS | --after-any IDS]
                    [-r RESERVATION] [--backend local|slurm] -- COMMAND
       gpurun ps [-a] [--json] [--backend local|slurm]
       gpurun gc [--dry-run] [--json]
       gpurun status [--detail] [--server NAME] [--json]
       gpurun kill JOB [-s SIGNAL] [--json] [--backend local|slurm]
       gpurun logs JOB [-f] [--backend local|slurm]
       gpurun wait JOB...
       gpurun alloc NAME [-g N] [-c N] [--server NAME|auto] [--ttl DURATION] [--json]
       gpurun release NAME|ID [--server NAME] [--json]
       gpurun reset [--yes] [--force] [--server NAME | --all]
       gpurun doctor [--json]

Reserve GPUs and CPUs on this server, run COMMAND pinned to them, free them when it ends.
Every command takes --config PATH, --server NAME and -v. 'gpurun COMMAND --help' says more.
"""


class BadValue(ValueError):
    """An option's value is wrong; the message says what was expected."""


def _parser(**kwargs: object) -> argparse.ArgumentParser:
    """An argparse parser whose mistakes raise UsageError instead of printing and exiting."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(f"{message}; see '{self.prog} --help'")

    # No abbreviated options: `--nam x` would mean --name to argparse but not to the quick
    # run parser, and the two must agree.
    return Parser(allow_abbrev=False, **kwargs)


def _typed(convert: object) -> object:
    """`convert` as an argparse type: BadValue becomes the error argparse shows."""
    import argparse

    def checked(text: str) -> object:
        try:
            return convert(text)
        except BadValue as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    checked.__name__ = convert.__name__
    return checked


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise BadValue(f"expected a whole number >= 0, got '{text}'")
    return int(text)


# The longest time a command line may give (--timeout, --time, --ttl): ten years. Longer ones
# overflow the kernel's timers and the ledger's times, and mean "forever" anyway.
MAX_SECONDS = 10 * 365 * 86400.0
# --priority runs from -MAX_PRIORITY to MAX_PRIORITY.
MAX_PRIORITY = 1_000_000


def _seconds(text: str) -> float:
    """A --timeout: seconds (0.5) or a duration (90s, 2m), from 0 up to ten years."""
    try:
        value = parse_duration(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_SECONDS:
        raise BadValue(
            f"expected seconds or a duration like 90s or 2m, from 0 to ten years, got '{text}'"
        )
    return value


def _gpu_ids(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise BadValue(f"expected GPU ids like 0,3, got '{text}'")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise BadValue(f"a GPU id is listed twice in '{text}'")
    return ids


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '30m', '2h', '1d' or '1h30m'; ValueError if not one of those."""
    text = text.strip().lower()
    if text.replace(".", "", 1).isdigit():
        return float(text)
    total = 0.0
    number = ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        elif char in DURATION_UNITS and number and number.count(".") <= 1:
            total += float(number) * DURATION_UNITS[char]
            number = ""
        else:
            raise ValueError(text)
    if number or not text:
        raise ValueError(text)
    return total


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError:
        raise BadValue(f"expected a duration like 90s, 30m, 2h or 1d, got '{text}'") from None
    if not 0 < value <= MAX_SECONDS:
        raise BadValue(f"expected a duration above 0 and at most ten years (3650d), got '{text}'")
    return value


def _priority(text: str) -> int:
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit() and abs(int(text)) <= MAX_PRIORITY):
        raise BadValue(
            f"expected a whole number from -{MAX_PRIORITY} to {MAX_PRIORITY}, got '{text}'"
        )
    return int(text)


def _job_ids(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts):
        raise BadValue(f"expected job ids like 4,7, got '{text}'")
    return tuple(int(p) for p in parts)


def _name(text: str) -> str:
    if not text or not text.isprintable() or len(text) > 200:
        raise BadValue("expected a printable name of 1-200 characters")
    if text.isascii() and text.isdigit():
        raise BadValue(f"'{text}' would read as a job id; add a letter")
    return text


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="config file (default: searched)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gpurun does")
    if not any(a.dest == "server" for a in parser._actions):
        parser.add_argument(
            "--server",
            type=_typed(_server_name),
            metavar="NAME",
            help="act as server NAME of the inventory (default: this host's)",
        )


def _backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=("local", "slurm"),
        help="run here (local) or hand the job to Slurm (default: the config's 'backend')",
    )


def _backend_name(text: str) -> str:
    if text not in ("local", "slurm"):
        raise ValueError(text)
    return text


def _server_name(text: str) -> str:
    from gpurun.inventory import is_name

    if text != "auto" and not is_name(text):
        raise BadValue(f"'{text}' is not a server name")
    return text


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command."""
    import argparse

    if command == "run":
        p = _parser(prog="gpurun run", description="Run COMMAND with reserved GPUs and CPUs.")
        p.add_argument("-g", "--gpus", type=_typed(_count), help="number of GPUs (default 0)")
        p.add_argument(
            "-c",
            "--cpus",
            type=_typed(_count),
            help="number of CPUs (default: cpus_per_gpu for each GPU, 1 with no GPU; "
            "0 means no pinning)",
        )
        p.add_argument("--gpu-ids", type=_typed(_gpu_ids), metavar="IDS", help="exactly these GPUs")
        p.add_argument("-n", "--name", type=_typed(_name), help="job name (default: the command's)")
        p.add_argument("--no-wait", action="store_true", help="exit 75 at once when busy")
        p.add_argument(
            "--timeout",
            type=_typed(_seconds),
            metavar="SECONDS",
            help="exit 75 if it cannot start within SECONDS",
        )
        p.add_argument(
            "-d",
            "--detach",
            action="store_true",
            help="queue the job, print its id and return; it runs in the background "
            "with its output in a log ('gpurun logs')",
        )
        p.add_argument(
            "--time",
            type=_typed(_duration),
            metavar="LIMIT",
            help="time limit (90s, 30m, 2h, 1d): SIGTERM when it passes, then SIGKILL "
            "after kill_grace; lets the job backfill",
        )
        p.add_argument(
            "--priority",
            type=_typed(_priority),
            default=0,
            help="queue priority, higher first (default 0; above 0 for root only)",
        )
        p.add_argument(
            "-r",
            "--reservation",
            metavar="NAME",
            help="run inside this reservation ('gpurun alloc'): all of it, or -g/-c of it",
        )
        group = p.add_mutually_exclusive_group()
        group.add_argument(
            "--after",
            type=_typed(_job_ids),
            metavar="IDS",
            help="start only once these jobs exited 0; cancelled if one fails",
        )
        group.add_argument(
            "--after-any",
            type=_typed(_job_ids),
            metavar="IDS",
            help="start once these jobs ended, however they ended",
        )
        _backend(p)
        _common(p)
        p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
        return p
    if command == "ps":
        p = _parser(prog="gpurun ps", description="List live jobs.")
        p.add_argument("-a", "--all", action="store_true", help="also finished jobs")
        p.add_argument("--json", action="store_true", help="print JSON")
        _backend(p)
    elif command == "gc":
        p = _parser(prog="gpurun gc", description="Drop leases whose processes are gone.")
        p.add_argument("--dry-run", action="store_true", help="only say what would be dropped")
        p.add_argument("--json", action="store_true", help="print JSON")
    elif command == "status":
        p = _parser(prog="gpurun status", description="Show who holds which GPUs and CPUs.")
        p.add_argument(
            "--detail", action="store_true", help="each server's GPUs and CPUs and who holds them"
        )
        p.add_argument(
            "--server", type=_typed(_server_name), metavar="NAME", help="only this server"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
    elif command == "alloc":
        p = _parser(
            prog="gpurun alloc", description="Reserve GPUs and CPUs with no process (a booking)."
        )
        p.add_argument(
            "name", type=_typed(_name), help="the reservation's name, unique among leases"
        )
        p.add_argument(
            "-g", "--gpus", type=_typed(_count), default=0, help="number of GPUs (default 0)"
        )
        p.add_argument(
            "-c",
            "--cpus",
            type=_typed(_count),
            help="number of CPUs (default: cpus_per_gpu per GPU)",
        )
        p.add_argument(
            "--server",
            type=_typed(_server_name),
            metavar="NAME",
            help="the server to reserve on, or 'auto' for the one with the most free GPUs "
            "(default: this host's)",
        )
        p.add_argument(
            "--ttl",
            type=_typed(_duration),
            metavar="DURATION",
            help="end by itself after DURATION (90s, 30m, 8h, 2d); default: until released",
        )
        p.add_argument("--json", action="store_true", help="print JSON")
    elif command == "release":
        p = _parser(prog="gpurun release", description="End a reservation.")
        p.add_argument("reservation", help="its name or id")
        p.add_argument(
            "--server", type=_typed(_server_name), metavar="NAME", help="where it is (default: any)"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
    elif command == "doctor":
        p = _parser(
            prog="gpurun doctor",
            description="Show the effective config and state dir, and any problems.",
        )
        p.add_argument("--json", action="store_true", help="print JSON")
    elif command == "kill":
        p = _parser(prog="gpurun kill", description="Signal every process of a job.")
        p.add_argument("job", help="job id or name")
        p.add_argument(
            "-s",
            "--signal",
            default="TERM",
            help="signal name or number (default TERM; TERM, INT, HUP and QUIT are "
            "followed by KILL after kill_grace)",
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        _backend(p)
    elif command == "logs":
        p = _parser(prog="gpurun logs", description="Show a detached job's output.")
        p.add_argument("job", help="job id or name")
        p.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
        _backend(p)
    elif command == "wait":
        p = _parser(prog="gpurun wait", description="Wait for jobs to end.")
        p.add_argument(
            "jobs",
            nargs="+",
            type=_typed(_job_ids),
            metavar="JOB",
            help="job ids; exits with the first failing job's code",
        )
    elif command == "reset":
        p = _parser(prog="gpurun reset", description="Move the ledger aside and start a new one.")
        p.add_argument("--yes", action="store_true", help="do not ask")
        p.add_argument("--force", action="store_true", help="even while live jobs hold leases")
        which = p.add_mutually_exclusive_group()
        which.add_argument(
            "--server", type=_typed(_server_name), metavar="NAME", help="this server's ledger"
        )
        which.add_argument("--all", action="store_true", help="every server's ledger")
    else:
        raise UsageError(f"unknown command '{command}'")
    _common(p)
    return p


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """Which command `argv` names, and the rest; anything else is `run`.

    The options every command takes (--config, --server, -v), and --backend, may come before
    its name; a command that takes no --backend then refuses it as a usage error.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-v", "--verbose") or arg.startswith(("--config=", "--server=", "--backend=")):
            i += 1
        elif arg in ("--config", "--server", "--backend"):
            i += 2
        else:
            break
    if i < len(argv) and argv[i] in COMMANDS:
        return argv[i], argv[:i] + argv[i + 1 :]
    return "run", argv


# The options the quick parser knows: option -> (dest, converter); None marks a flag.
COMMON_OPTIONS = {
    "--config": ("config", str),
    "-v": ("verbose", None),
    "--verbose": ("verbose", None),
    "--server": ("server", _server_name),
}
BACKEND_OPTION = {"--backend": ("backend", _backend_name)}
RUN_OPTIONS = {
    "-g": ("gpus", _count),
    "--gpus": ("gpus", _count),
    "-c": ("cpus", _count),
    "--cpus": ("cpus", _count),
    "--gpu-ids": ("gpu_ids", _gpu_ids),
    "-n": ("name", _name),
    "--name": ("name", _name),
    "--no-wait": ("no_wait", None),
    "--timeout": ("timeout", _seconds),
    "-d": ("detach", None),
    "--detach": ("detach", None),
    "--time": ("time", _duration),
    "--priority": ("priority", _priority),
    "-r": ("reservation", str),
    "--reservation": ("reservation", str),
    "--after": ("after", _job_ids),
    "--after-any": ("after_any", _job_ids),
    **COMMON_OPTIONS,
    **BACKEND_OPTION,
}
# The commands run thousands of times (a launch; ps and status in watch loops and scripts),
# whose plain forms skip argparse.
QUICK_OPTIONS = {
    "run": RUN_OPTIONS,
    "ps": {"-a": ("all", None), "--all": ("all", None), "--json": ("json", None)}
    | COMMON_OPTIONS
    | BACKEND_OPTION,
    "status": {"--detail": ("detail", None), "--json": ("json", None)} | COMMON_OPTIONS,
}


class _Parsed:
    """Options as attributes, as argparse's Namespace holds them (types.SimpleNamespace would
    do, but importing types costs a launch 0.3 ms)."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def quick_args(command: str, options: list[str]) -> object | None:
    """Parse the plain command lines of QUICK_OPTIONS' commands as build_parser would,
    without argparse; for `run`, what follows the options is the command.

    Importing argparse, and the gettext, locale and shutil it pulls in, costs a launch about
    half of what the interpreter takes to start. Anything outside the plain forms (bundled
    or abbreviated options, a value that starts with '-', a bad value, --help, both --after
    and --after-any, a word after the options of ps or status) returns None, and argparse
    then parses it and words the error.
    """
    known_options = QUICK_OPTIONS[command]
    values: dict[str, object] = {
        dest: False if convert is None else None for dest, convert in known_options.values()
    }
    if command == "run":
        values["priority"] = 0
    i = 0
    while i < len(options):
        option, joined, value = options[i].partition("=")
        if not option.startswith("-"):
            break
        known = known_options.get(option)
        if known is None or (joined and not option.startswith("--")):
            return None
        dest, convert = known
        if convert is None:
            if joined:
                return None
            values[dest] = True
            i += 1
            continue
        if not joined:
            if i + 1 >= len(options) or options[i + 1].startswith("-"):
                return None
            value = options[i + 1]
        try:
            values[dest] = convert(value)
        except (ValueError, TypeError):
            return None
        i += 1 if joined else 2
    if command != "run":
        return _Parsed(**values) if i == len(options) else None
    if values["after"] is not None and values["after_any"] is not None:
        return None
    return _Parsed(**values, command=options[i:])


def _split_run(argv: list[str]) -> tuple[list[str], list[str]]:
    """gpurun's options and the command: split at a `--` that comes before the command's
    first word; a `--` after it belongs to the command (`gpurun python t.py -- --lr 3`)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return argv[:i], argv[i + 1 :]
        if not arg.startswith("-") or arg == "-":
            break
        known = RUN_OPTIONS.get(arg)
        i += 2 if known is not None and known[1] is not None else 1
    return argv[:i], argv[i:]


def main(argv: list[str] | None = None) -> int:
    """Run gpurun with `argv` (default sys.argv[1:]); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = False
    # Commands and names may hold bytes that are not valid in the locale's encoding.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        if not argv:
            raise UsageError("no command given; 'gpurun --help' lists the commands")
        if argv[0] in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if argv[0] == "--version":
            print(f"gpurun {__version__}")
            return 0
        command, rest = split_command(argv)
        if command == "run":
            options, tail = _split_run(rest)
            args = quick_args("run", options) or build_parser("run").parse_args(options)
            args.command = [*args.command, *tail]
        elif command in QUICK_OPTIONS:
            args = quick_args(command, rest) or build_parser(command).parse_args(rest)
        else:
            args = build_parser(command).parse_args(rest)
        if args.config == "":
            raise UsageError("--config needs a file path")
        verbose = args.verbose
        if verbose:
            _configure_logging()
        return _dispatch(command, args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except BusyError as exc:
        return _fail(str(exc), EXIT_BUSY)
    except CommandError as exc:
        return _fail(str(exc), exc.exit_code)
    except Interrupted as exc:
        return _fail(str(exc), 128 + exc.signum)
    except GpurunError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was reserved", EXIT_INTERRUPTED)
    except SystemExit as exc:
        # argparse's --help prints the help and exits; main returns the code instead.
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        return _fail(
            f"internal error: {exc!r}; run with -v for details and report it", EXIT_FAILURE
        )


def _dispatch(command: str, args: argparse.Namespace) -> int:
    from gpurun.config import load_config

    if args.server == "auto" and command != "alloc":
        raise UsageError("--server auto is only for 'gpurun alloc'; name a server")
    config = load_config(args.config, args.server if command in AS_SERVER else None)
    if args.verbose:
        import logging

        from gpurun.cpulist import format_cpulist

        logging.getLogger("gpurun.cli").debug(
            "config %s; server %s; state dir %s; GPUs %s; CPUs %s",
            config.path or "(built-in defaults)",
            config.server,
            config.state_dir,
            ",".join(map(str, config.gpus)) or "none",
            format_cpulist(config.cpus) or "none",
        )
    backend = getattr(args, "backend", None) or config.backend
    if command == "run":
        if backend == "slurm":
            return _run_slurm(args, config)
        return _run(args, config)
    from gpurun import jobs, render

    if command == "ps":
        if args.json:
            rows = jobs.list_jobs(config, include_finished=args.all)
        else:
            rows = jobs.list_table(config, include_finished=args.all)
        if backend == "slurm":
            from gpurun import slurm

            theirs = slurm.list_jobs(include_finished=args.all)
            if args.json:
                rows = [dict(row, backend="local") for row in rows]
                rows.extend(theirs)
            else:
                rows.extend(render.job_cells(job) for job in theirs)
        print(render.to_json(rows) if args.json else render.jobs_table(rows))
    elif command == "gc":
        dropped = jobs.collect_garbage(config, dry_run=args.dry_run)
        print(render.to_json(dropped) if args.json else render.gc_text(dropped, args.dry_run))
    elif command == "status":
        status = jobs.server_status(config, args.server, full=args.json or args.detail)
        if args.json:
            print(render.to_json(status))
        else:
            print(render.status_text(status, detail=args.detail))
    elif command == "alloc":
        from gpurun.reservations import allocate

        booked = allocate(config, args.name, args.gpus, args.cpus, args.server, args.ttl)
        if args.json:
            print(render.to_json(booked))
        else:
            sys.stderr.write(render.reservation_text(booked) + "\n")
            import shlex

            env = booked["env"].items()
            print("\n".join(f"export {key}={shlex.quote(value)}" for key, value in env))
    elif command == "release":
        from gpurun.reservations import release

        ended = release(config, args.reservation, args.server)
        if args.json:
            print(render.to_json(ended))
        else:
            print(f"released reservation {ended['id']} '{ended['name']}' on {ended['server']}")
    elif command == "doctor":
        from gpurun.doctor import diagnose, doctor_text

        report = diagnose(config)
        print(render.to_json(report) if args.json else doctor_text(report))
        return 1 if report["problems"] else 0
    elif command == "kill" and (backend == "slurm" or args.job.startswith("slurm:")):
        from gpurun import slurm

        result = slurm.kill_job(args.job, jobs.parse_signal(args.signal))
        if args.json:
            print(render.to_json(result))
        else:
            print(f"Slurm job {result['id']}: sent {', '.join(result['signals'])} (scancel)")
    elif command == "kill":
        result = jobs.kill_job(config, args.job, jobs.parse_signal(args.signal))
        if args.json:
            print(render.to_json(result))
        else:
            print(f"job {result['id']} ({result['name']}): sent {', '.join(result['signals'])}")
    elif command == "reset":
        if not args.yes and not _confirm(f"Start a new ledger in {config.state_dir}?"):
            raise UsageError(
                "reset not confirmed; nothing was changed (use --yes to skip the question)"
            )
        from gpurun.inventory import server_names

        if args.server and args.server not in server_names(config):
            known = ", ".join(server_names(config))
            raise NotFoundError(f"no server named '{args.server}'; the servers are {known}")
        for name in server_names(config) if args.all else [args.server]:
            result = jobs.reset_ledger(config, force=args.force, server=name)
            moved = result["moved_to"]
            print(f"new ledger {result['ledger']}" + (f"; the old one is {moved}" if moved else ""))
    elif command == "logs" and (backend == "slurm" or args.job.startswith("slurm:")):
        from gpurun import slurm

        return slurm.show_log(args.job, follow=args.follow)
    elif command == "logs":
        return jobs.show_log(config, args.job, follow=args.follow)
    elif command == "wait":
        return jobs.wait_for_jobs(config, [i for ids in args.jobs for i in ids])
    return 0


def _run(args: argparse.Namespace, config: object) -> int:
    from gpurun.launch import Spec, run_job
    from gpurun.ledger import Request

    if not args.command:
        raise UsageError(
            "no command given; put it after --, as in 'gpurun -g 1 -- python train.py'"
        )
    gpus = args.gpus
    if args.gpu_ids is not None:
        if gpus is not None and gpus != len(args.gpu_ids):
            ids = ",".join(map(str, args.gpu_ids))
            raise UsageError(f"-g {gpus} disagrees with --gpu-ids {ids}; give only one of them")
        gpus = len(args.gpu_ids)
    gpus = gpus or 0
    cpus = args.cpus
    if cpus is None:
        cpus = max(1, gpus * config.cpus_per_gpu)
        cpus = min(cpus, len(config.cpus)) if config.cpus else 0
    if args.detach and (args.no_wait or args.timeout is not None):
        raise UsageError(
            "-d queues the job and returns at once; it takes no --no-wait or --timeout"
        )
    request = Request(gpus=gpus, cpus=cpus, gpu_ids=args.gpu_ids)
    if args.reservation is not None:
        if args.detach or args.after or args.after_any or args.priority:
            raise UsageError(
                "-r runs at once inside the reservation; it takes no -d, --after or --priority"
            )
        if args.gpus is None and args.gpu_ids is None and args.cpus is None:
            request = None
        elif args.cpus is None:
            request = request._replace(cpus=None)
    spec = Spec(
        request=request,
        command=args.command,
        name=args.name,
        priority=args.priority,
        time_limit=args.time,
        after=args.after or args.after_any or (),
        after_any=args.after_any is not None,
        reservation=args.reservation,
    )
    try:
        return run_job(
            config, spec, wait=not args.no_wait, timeout=args.timeout, detach=args.detach
        )
    except CommandError as exc:
        raise _with_hint(exc, args.command[0]) from None


def _run_slurm(args: argparse.Namespace, config: object) -> int:
    """Hand the job to Slurm: srun in the foreground, sbatch with -d."""
    from gpurun import slurm

    if not args.command:
        raise UsageError(
            "no command given; put it after --, as in 'gpurun -g 1 -- python train.py'"
        )
    for given, option in (
        (args.gpu_ids is not None, "--gpu-ids"),
        (args.reservation is not None, "-r"),
        (args.priority != 0, "--priority"),
    ):
        if given:
            raise UsageError(f"{option} is for local runs; Slurm chooses GPUs and orders its queue")
    if args.detach and (args.no_wait or args.timeout is not None):
        raise UsageError(
            "-d queues the job and returns at once; it takes no --no-wait or --timeout"
        )
    # Looked up here first, as a local run does (127, 126): the nodes of a cluster share its
    # file systems, and srun alone would answer a typo with exit 2 and its own words.
    from gpurun.supervise import resolve_command

    try:
        resolve_command(args.command[0])
    except CommandError as exc:
        raise _with_hint(exc, args.command[0]) from None
    comment = slurm.job_comment(args.command)
    options = slurm.job_options(
        gpus=args.gpus or 0,
        cpus=args.cpus,
        name=args.name or os.path.basename(args.command[0]),
        time_limit=args.time,
        after=args.after or args.after_any or (),
        after_any=args.after_any is not None,
        config=config,
        comment=comment,
    )
    if args.detach:
        print(slurm.submit(options, args.command, args.cpus))
        return 0
    wait = 0.0 if args.no_wait else args.timeout
    return slurm.run_foreground(options, args.command, args.cpus, wait, comment)


def _with_hint(exc: CommandError, word: str) -> CommandError:
    """Add "did you mean 'gpurun status'?" when a typo ran as a command."""
    if exc.exit_code != 127 or "/" in word:
        return exc
    import difflib

    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.7)
    if not close:
        return exc
    problem = exc.message.split(": ", 1)[1]
    return CommandError(word, f"{problem}; did you mean 'gpurun {close[0]}'?", 127)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _configure_logging() -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG, format="gpurun: %(name)s: %(message)s", stream=sys.stderr
    )


def _fail(message: str, code: int) -> int:
    """Print one line: control characters in what the user typed are shown escaped."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    try:
        sys.stderr.write(f"gpurun: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code
