"""The errors gpurun raises for users to read.

Each class keeps the facts of the failure as attributes and builds its one-line message from
them. Only `cli.main` prints them and turns them into exit codes (see `cli.EXIT_CODES`).
"""

from __future__ import annotations


class GpurunError(Exception):
    """A failure the user can act on; `str()` is the message without the `gpurun: ` prefix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(GpurunError):
    """The command line is wrong (exit 2)."""


class ConfigError(GpurunError):
    """The config file is wrong; names the file, the key and, for YAML syntax, the line."""

    def __init__(self, path: str, problem: str, key: str = "", line: int = 0) -> None:
        self.path = path
        self.key = key
        self.line = line
        self.problem = problem
        where = path
        if line:
            where += f", line {line}"
        if key:
            where += f", key '{key}'"
        super().__init__(f"{where}: {problem}")


class LedgerError(GpurunError):
    """The ledger or its lock cannot be used; nothing was changed."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class CapacityError(GpurunError):
    """The request can never fit on this server (exit 125)."""


class BusyError(GpurunError):
    """The request does not fit now and the caller asked not to wait longer (exit 75)."""


class NotFoundError(GpurunError):
    """No job or lease matches what the user named."""


class RefusedError(GpurunError):
    """The user may not act on another user's job."""


class CommandError(GpurunError):
    """The command cannot be started: not found (127) or not executable (126)."""

    def __init__(self, command: str, problem: str, exit_code: int) -> None:
        self.command = command
        self.exit_code = exit_code
        super().__init__(f"{command}: {problem}")


class Interrupted(GpurunError):
    """A signal ended gpurun while it waited; nothing was left in the ledger."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by signal {signum} while waiting; nothing was reserved")


class SlurmError(GpurunError):
    """A Slurm command (srun, sbatch, squeue, scancel) failed; `reason` is Slurm's (exit 125)."""

    def __init__(self, program: str, reason: str) -> None:
        self.program = program
        self.reason = reason
        super().__init__(f"{program} failed: {reason}")
