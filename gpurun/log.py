"""Loggers that cost nothing on the launch path until someone asks for output.

Importing `logging` takes about as long as starting the interpreter, and a launch that nobody
runs with `-v` would throw its DEBUG records away. So debug and info records go to the real
logger only once `logging` is imported (the CLI does that for `-v`); warnings always do.
"""

from __future__ import annotations

import sys


class LazyLogger:
    """A stand-in for `logging.getLogger(name)` with the same %-style methods."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: str, *args: object) -> None:
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.getLogger(self.name).debug(msg, *args)

    def info(self, msg: str, *args: object) -> None:
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.getLogger(self.name).info(msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        """Through logging once the CLI set it up (-v); else one `gpurun: ` line on stderr."""
        logging = sys.modules.get("logging")
        if logging is not None and logging.getLogger().handlers:
            logging.getLogger(self.name).warning(msg, *args)
            return
        try:
            sys.stderr.write(f"gpurun: {msg % args if args else msg}\n")
        except (OSError, ValueError):
            pass


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
