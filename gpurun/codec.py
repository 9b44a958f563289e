"""JSON for the ledger, the history and the config cache, without `import json`.

`import json` costs a launch more than all of gpurun's own modules: json.decoder compiles
regular expressions when it is imported, which pulls in re, enum and functools, about 7 ms
against 12 ms for the bare interpreter on a 2-CPU machine (measured with `python -X
importtime` and wall time; see bench/). The parsing and encoding themselves are done by the
C module `_json` either way. This module calls that C code as the json package does, with the
settings of `json.loads` and of `json.dumps(value, separators=(",", ":"))`, so files read and
written here are the ones json would read and write. Where `_json` is missing (an interpreter
other than CPython), it falls back to the json package.

Malformed text raises ValueError, as json.loads does (its JSONDecodeError is one).
"""

from __future__ import annotations

_SPACE = " \t\n\r"
_INFINITY = float("inf")
_NAN = float("nan")

try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:
    _make_scanner = None


class _Settings:
    """What the C scanner reads from a json.JSONDecoder: the defaults of json.loads."""

    def __init__(self) -> None:
        self.strict = True
        self.object_hook = None
        self.object_pairs_hook = None
        self.parse_float = float
        self.parse_int = int
        self.parse_constant = {"-Infinity": -_INFINITY, "Infinity": _INFINITY, "NaN": _NAN}.get


def _explain(text: str | bytes) -> object:
    """What json.loads makes of `text`, where this module's fast path gave up: json's
    ValueError for malformed text, or the value of text in an encoding it does not read."""
    import json

    return json.loads(text)


def _unknown(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON data")


if _make_scanner is not None:
    _scan = _make_scanner(_Settings())
    # Arguments: markers (None: no check for cycles, which gpurun's data never has), default,
    # string quoting, indent, key and item separators, sort_keys, skipkeys, allow_nan.
    _encode = _make_encoder(None, _unknown, _quote, None, ":", ",", False, False, True)

    def loads(text: str | bytes) -> object:
        """The value of a JSON document; ValueError when it is not exactly one."""
        if isinstance(text, bytes | bytearray):
            # json.loads reads bytes in UTF-8, -16 or -32, with or without a BOM, and lets
            # surrogates through; plain UTF-8 is all gpurun writes, anything else goes to json.
            if text.startswith(b"\xef\xbb\xbf") or 0 in text[:4]:
                return _explain(text)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                return _explain(text)
        start = len(text) - len(text.lstrip(_SPACE))
        try:
            value, end = _scan(text, start)
        except (StopIteration, SystemError):
            # The C scanner builds its error from json.decoder, and fails with SystemError
            # while that is not imported (CPython 3.11); json says what is wrong instead.
            return _explain(text)
        if text[end:].strip(_SPACE):
            return _explain(text)
        return value

    def dumps(value: object) -> str:
        """`value` as JSON on one line, with no spaces after , and : (as the ledger is)."""
        return "".join(_encode(value, 0))

else:
    import json

    def loads(text: str | bytes) -> object:
        return json.loads(text)

    def dumps(value: object) -> str:
        return json.dumps(value, separators=(",", ":"))
