"""Commands: a typed header and a rank half, declared together by each op family.

The driver builds a header, :meth:`cmatrix.engine.driver.Driver.run` sends it and runs
the command's rank half itself; every worker rebuilds the same header and runs the same
rank half, so the two sides cannot disagree about a field. A family module
(``cmatrix.ops.*``) declares both, side by side::

    @dataclass(frozen=True)
    class Gather(Header, op="gather"):
        id: int
        shape: tuple[int, int]
        ...

    @on_ranks(Gather)
    def _gather(rt: Runtime, h: Gather, payload: Any) -> np.ndarray | None: ...

On the wire a header is a small dict, ``{"op": name, **fields}`` (pickled by
:mod:`cmatrix.engine.comm`), plus ``"free"``: ids released since the last command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import CMatrixError

#: command name -> header class
HEADERS: dict[str, type[Header]] = {}
#: command name -> rank half, ``fn(rt, header, payload)``; payload is the driver's data (None elsewhere)
RANK_HALVES: dict[str, Callable[[Any, Any, Any], Any]] = {}


class Header:
    """Base of every command's header. Subclasses are frozen dataclasses declared with
    ``class X(Header, op="name")``; their fields are all a rank needs to run the command."""

    op: ClassVar[str] = ""
    #: fields naming blocks the command creates: freed on every rank if it fails
    CREATES: ClassVar[tuple[str, ...]] = ()
    #: whether ids released since the last command are freed before it runs (else after)
    frees_first: ClassVar[bool] = True

    def __init_subclass__(cls, op: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if op:
            if op in HEADERS:
                raise TypeError(f"command {op!r} is declared twice ({HEADERS[op].__qualname__}, "
                                f"{cls.__qualname__})")
            cls.op = op
            HEADERS[op] = cls

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, **self.__dict__}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> Header:
        # The driver built these fields through __init__; filling the instance directly
        # keeps a worker's per-command cost low (a frozen dataclass sets fields one by one).
        header = object.__new__(cls)
        header.__dict__.update(fields)
        return header

    def created(self) -> list[int]:
        """Ids of the blocks this command creates (see ``CREATES``)."""
        return [i for i in (getattr(self, name) for name in self.CREATES) if i is not None]


def on_ranks(header: type[Header]) -> Callable[[Callable], Callable]:
    """Declare ``fn(rt, h, payload)`` the rank half of ``header``'s command."""

    def register(fn: Callable) -> Callable:
        if header.op in RANK_HALVES:
            raise TypeError(f"command {header.op!r} has two rank halves")
        RANK_HALVES[header.op] = fn
        return fn

    return register


def decode(message: dict[str, Any]) -> tuple[Header, tuple[int, ...]]:
    """A received wire dict -> (header, ids to free)."""
    op = message.pop("op")
    frees = tuple(message.pop("free", ()))
    cls = HEADERS.get(op)
    if cls is None:
        raise CMatrixError(f"unknown command {op!r} (is every rank running the same cmatrix?)")
    return cls.from_wire(message), frees
