"""What the contract, preflight and smoke reports share: pass/fail/skip entries and a text table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class GateVerdict:
    """What a pre-flush gate found, and whether the policy says that stops the flush."""

    failures: list[dict[str, Any]]
    blocks: bool


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain-text columns; the last column (free text) is left unpadded."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    lines = []
    for row in cells:
        padded = [value.ljust(width) for value, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


class StatusReport:
    """A report over entries that each have a `status`, a `detail` and `to_dict()`.

    Subclasses say where the entries are (`entries()`) and what one is called (`entry_name`).
    """

    entry_name = "check"

    def entries(self) -> Sequence[Any]:
        raise NotImplementedError

    @property
    def ok(self) -> bool:
        return all(entry.status is not Status.FAIL for entry in self.entries())

    def failures(self) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in self.entries() if entry.status is Status.FAIL]

    def table(self) -> str:
        rows = [
            (getattr(entry, self.entry_name), entry.status.value, entry.detail)
            for entry in self.entries()
        ]
        return render_table((self.entry_name, "status", "detail"), rows)
