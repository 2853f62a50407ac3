"""Name -> function registries for advantage estimators, loss aggregation modes and KL
estimators, so a config string picks the algorithm (verl's `register_adv_est` idea).

An unknown name fails at lookup with the list of valid names, not deep inside a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UnknownName(ValueError):
    """A name that is not in a registry; the message lists the valid names."""


class Registry(Generic[F]):
    """A small named table of functions of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            valid = ", ".join(sorted(self._fns))
            raise UnknownName(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._fns))
