"""One-dimensional PostgreSQL arrays in binary form, built in a few C-level calls.

The writer passes each batch's columns as arrays (``unnest(%b::int8[], ...)``). psycopg's own
list dumper works element by element in Python: about 80 us for a 40-element array here, 22
arrays a batch, so about 45 us of every stored envelope's CPU (docs/performance.md). These
wrappers carry the finished bytes instead: ``Int8s([1, 2])`` is dumped as an ``int8[]``
parameter, one ``struct.pack`` for numbers and one ``bytes.join`` for text.

The binary array layout (PostgreSQL's ``array_send``): dimensions, a has-null flag, the
element type, then for each dimension its length and lower bound (1), then each element as
a 4-byte length (``-1`` for NULL) and its bytes. ``None`` is NULL.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from typing import ClassVar, Final

import psycopg
from psycopg import postgres
from psycopg.abc import AdaptContext
from psycopg.adapt import Dumper
from psycopg.pq import Format

# PostgreSQL's binary timestamptz: microseconds since 2000-01-01 UTC.
PG_EPOCH_MS: Final = 946_684_800_000
_HEADER: Final = struct.Struct(">iiiii")
_EMPTY: Final = struct.Struct(">iii")
_LENGTH: Final = struct.Struct(">i")
_NULL: Final = _LENGTH.pack(-1)


class PgArray:
    """Finished bytes of one array parameter; a subclass per element type."""

    __slots__ = ("data",)
    element: ClassVar[str]

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def _wrap(cls, n: int, has_null: bool, body: bytes) -> bytes:
        oid = postgres.types[cls.element].oid
        if n == 0:
            return _EMPTY.pack(0, 0, oid)
        return _HEADER.pack(1, int(has_null), oid, n, 1) + body


class _Fixed(PgArray):
    """Elements of one fixed width: packed by one ``struct`` format."""

    __slots__ = ()
    code: ClassVar[str]
    width: ClassVar[int]

    def __init__(self, values: Iterable[object]) -> None:
        values = list(values)
        present = [v for v in values if v is not None]
        body = self._pack(present)
        if len(present) < len(values):  # NULLs between the packed elements
            width, packed = 4 + self.width, iter(range(0, len(body), 4 + self.width))
            body = b"".join(
                _NULL if v is None else body[(i := next(packed)) : i + width] for v in values
            )
        super().__init__(self._wrap(len(values), len(present) < len(values), body))

    @classmethod
    def _pack(cls, values: Sequence[object]) -> bytes:
        try:
            return struct.pack(
                ">" + ("i" + cls.code) * len(values),
                *chain.from_iterable(zip(repeat(cls.width), values)),
            )
        except struct.error as exc:  # a value out of the type's range, or not a number
            raise ValueError(f"{cls.element}[] element refused: {exc}") from exc


class Int2s(_Fixed):
    __slots__ = ()
    element = "int2"
    code = "h"
    width = 2


class Int4s(_Fixed):
    __slots__ = ()
    element = "int4"
    code = "i"
    width = 4


class Int8s(_Fixed):
    __slots__ = ()
    element = "int8"
    code = "q"
    width = 8


class Float8s(_Fixed):
    __slots__ = ()
    element = "float8"
    code = "d"
    width = 8


class TimestamptzMs(Int8s):
    """``timestamptz[]`` from integer milliseconds since the Unix epoch."""

    __slots__ = ()
    element = "timestamptz"

    def __init__(self, values: Iterable[int | None]) -> None:
        super().__init__(None if v is None else (v - PG_EPOCH_MS) * 1000 for v in values)


class Byteas(PgArray):
    __slots__ = ()
    element = "bytea"

    def __init__(self, values: Iterable[bytes | None]) -> None:
        values = list(values)
        super().__init__(self._wrap(len(values), None in values, _join(values)))


class Texts(PgArray):
    __slots__ = ()
    element = "text"

    def __init__(self, values: Iterable[str | None]) -> None:
        encoded = [None if v is None else v.encode() for v in values]
        super().__init__(self._wrap(len(encoded), None in encoded, _join(encoded)))


def _join(values: Sequence[bytes | None]) -> bytes:
    pack = _LENGTH.pack
    return b"".join(
        chain.from_iterable((_NULL,) if v is None else (pack(len(v)), v) for v in values)
    )


def _dumper(cls: type[PgArray]) -> type[Dumper]:
    array_oid = postgres.types[cls.element].array_oid

    class _ArrayDumper(Dumper):
        # The type's oid is set per instance, not on the class: psycopg registers a dumper
        # whose class names an oid as the dumper of that oid for everyone (COPY's set_types
        # would hand it a list).
        format = Format.BINARY

        def __init__(self, cls: type, context: AdaptContext | None = None) -> None:
            super().__init__(cls, context)
            self.oid = array_oid

        def dump(self, obj: PgArray) -> bytes:
            return obj.data

    _ArrayDumper.__name__ = f"{cls.__name__}Dumper"
    return _ArrayDumper


# By class only, on psycopg's global map: every connection made after this module is imported
# knows them.
for _cls in (Int2s, Int4s, Int8s, Float8s, TimestamptzMs, Byteas, Texts):
    psycopg.adapters.register_dumper(_cls, _dumper(_cls))
