"""
``record``: a frozen dataclass for the type checker, a cheap one at run time.

A frozen dataclass sets each field through ``object.__setattr__``, which makes
it three to four times as slow to build as a plain one (4.4 against 1.3 us
for the twelve fields of ``Metrics`` on a 2-core node).  The records built for
every status or metrics read, every resource sample and every console line
add up to several percent of a read's CPU.  ``@record`` gives those classes
what mypy knows as a frozen dataclass (``dataclass_transform`` with
``frozen_default``: assigning a field is a type error, and mypy checks every
module of the agent), and at run time a slotted dataclass that hashes and
compares by its fields like a frozen one, but does not refuse an assignment.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

_T = TypeVar("_T")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform

    @dataclass_transform(frozen_default=True)
    def record(cls: type[_T]) -> type[_T]:
        """A frozen dataclass (see the module docstring)."""
        ...

else:

    def record(cls: type[Any]) -> type[Any]:
        """A slotted dataclass, hashed by its fields (see the module docstring)."""
        return dataclass(slots=True, unsafe_hash=True)(cls)
