"""Structured events in a service's log: one JSON object per line after a stable marker, so
that benches and tests read them back by key instead of matching the wording of a message.

    loraloop.event {"event":"adapter_loaded","adapter":"policy@v3","version":3,...}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = "loraloop.event "


def emit(logger: logging.Logger, event: str, **fields: Any) -> None:
    """Log `event` with `fields` (JSON-serialisable) at INFO."""
    logger.info("%s%s", MARKER, json.dumps({"event": event, **fields}, separators=(",", ":")))


def read(lines: Iterable[str], event: str) -> list[dict[str, Any]]:
    """The `event` records in `lines` (log lines, any prefix before the marker), in order."""
    out = []
    for line in lines:
        at = line.find(MARKER)
        if at < 0:
            continue
        try:
            record = json.loads(line[at + len(MARKER):])
        except json.JSONDecodeError:  # a line cut short (the process died mid-write)
            continue
        if record.get("event") == event:
            out.append(record)
    return out


def read_file(path: str | Path, event: str) -> list[dict[str, Any]]:
    return read(Path(path).read_text(errors="replace").splitlines(), event)
