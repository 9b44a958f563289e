"""Immutable records with named fields: the part of collections.namedtuple gpurun uses.

Every launch defines about ten record types (config, server, lease, request...) before it
does anything. `import collections` alone costs a launch about 1.4 ms, and each namedtuple
another 75 us as it compiles its methods, together a fifth of what gpurun adds to the bare
interpreter's start on a 2-CPU machine (measured with wall time; see bench/). These records
are built from the same C pieces namedtuple uses (a tuple subclass, _collections'
field getters) without either cost.

A record type is a tuple of its fields in order, built positionally or by keyword, with
defaults for its last fields; it has `_fields`, `_replace(**changes)` and `_asdict()`, and
compares and hashes as a tuple, as a namedtuple does.
"""

from __future__ import annotations

from _collections import _tuplegetter

_MISSING = object()


def record(name: str, fields: str, defaults: tuple[object, ...] = ()) -> type:
    """A tuple subclass named `name` with the space-separated `fields`; `defaults` are the
    values of the last len(defaults) of them."""
    names = tuple(fields.split())
    count = len(names)
    index = {field: i for i, field in enumerate(names)}
    first_default = count - len(defaults)

    def __new__(cls: type, *args: object, **kwargs: object) -> tuple:
        if not kwargs and len(args) == count:
            return tuple.__new__(cls, args)
        if len(args) > count:
            raise TypeError(f"{name} takes {count} fields, got {len(args)}")
        values = [*args, *([_MISSING] * (count - len(args)))]
        for field, value in kwargs.items():
            at = index.get(field)
            if at is None or values[at] is not _MISSING:
                raise TypeError(f"{name} got an unknown or repeated field {field!r}")
            values[at] = value
        for at in range(first_default, count):
            if values[at] is _MISSING:
                values[at] = defaults[at - first_default]
        missing = [names[at] for at, value in enumerate(values) if value is _MISSING]
        if missing:
            raise TypeError(f"{name} is missing {', '.join(missing)}")
        return tuple.__new__(cls, values)

    def _replace(self: tuple, **changes: object) -> tuple:
        values = list(self)
        for field, value in changes.items():
            at = index.get(field)
            if at is None:
                raise TypeError(f"{name} has no field {field!r}")
            values[at] = value
        return tuple.__new__(type(self), values)

    def _asdict(self: tuple) -> dict[str, object]:
        return dict(zip(names, self, strict=True))

    def __repr__(self: tuple) -> str:
        shown = ", ".join(f"{field}={value!r}" for field, value in zip(names, self, strict=True))
        return f"{type(self).__name__}({shown})"

    body: dict[str, object] = {
        "__slots__": (),
        "_fields": names,
        "__new__": __new__,
        "_replace": _replace,
        "_asdict": _asdict,
        # Built from a tuple of exactly its fields, with no check: for records read in bulk.
        "_make": classmethod(tuple.__new__),
        "__repr__": __repr__,
        "__match_args__": names,
    }
    for at, field in enumerate(names):
        body[field] = _tuplegetter(at, f"field {at}: {field}")
    return type(name, (tuple,), body)
