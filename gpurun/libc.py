"""Calls into the C library for what the os module lacks: prctl(2) and inotify(7).

gpurun makes such a call on every launch (it becomes a child subreaper), and `import ctypes`
costs about 2 ms, a sixth of the bare interpreter's start on a 2-CPU machine (measured with
wall time; see bench/), most of it spent building ctypes' type classes, which these calls do
not need. So they go through ctypes' C core, `_ctypes`, as ctypes.CDLL does underneath, and
through ctypes itself where that core lacks the functions used here.

Arguments are ints (passed as C int) and bytes (passed as char *); the result is the C
function's int return value.
"""

from __future__ import annotations

_handle: int | None = None


def call(function: str, *args: int | bytes) -> int:
    """Call the C library's `function` with `args`; OSError if there is no such function."""
    global _handle
    try:
        import _ctypes

        if _handle is None:
            _handle = _ctypes.dlopen(None)
        return _ctypes.call_function(_ctypes.dlsym(_handle, function), args)
    except (ImportError, AttributeError):
        import ctypes

        try:
            return getattr(ctypes.CDLL(None), function)(*args)
        except AttributeError:
            raise OSError(f"the C library has no {function}") from None
