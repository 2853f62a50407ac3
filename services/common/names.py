"""Adapter names and selectors (`name`, `name@latest`, `name@v17`).

Names come from the wire and end up in Redis keys and cache paths, so they are validated
here and nowhere else: `[a-z0-9][a-z0-9._-]{0,63}`, and never `.`/`..` path segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SELECTOR_RE = re.compile(r"(?P<name>[^@]+)(?:@(?:v(?P<version>[0-9]+)|(?P<latest>latest)))?")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidArgument."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid adapter name {name!r}: must match [a-z0-9][a-z0-9._-]{{0,63}} without '..'"
        )
    return name


@dataclass(frozen=True)
class AdapterSelector:
    """A parsed selector; `version == 0` means "latest, resolved at admission"."""

    name: str
    version: int = 0

    @property
    def is_latest(self) -> bool:
        return self.version == 0

    def __str__(self) -> str:
        return f"{self.name}@latest" if self.is_latest else f"{self.name}@v{self.version}"


def parse_selector(text: str) -> AdapterSelector:
    """Parse `name`, `name@latest` or `name@vN` (N >= 1)."""
    m = _SELECTOR_RE.fullmatch(text or "")
    if not m:
        raise InvalidArgument(f"invalid adapter selector {text!r}: use NAME, NAME@latest or NAME@vN")
    name = validate_name(m.group("name"))
    version = int(m.group("version")) if m.group("version") else 0
    if m.group("version") is not None and version < 1:
        raise InvalidArgument(f"invalid adapter selector {text!r}: versions start at v1")
    if version >= 2**64:  # versions are uint64 on the wire
        raise InvalidArgument(f"invalid adapter selector {text!r}: no version is that large")
    return AdapterSelector(name, version)
