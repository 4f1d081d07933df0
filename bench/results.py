"""What every benchmark returns: a :class:`Result` of tables, metrics and goals.

Tables are for people, flat ``metrics`` for machines (units in the name: ``_us``,
``_ms``, ``_per_s``, ``_mb``, ``_ratio``), and the goals the issue set say whether this
run met them. ``python -m bench`` writes them as JSON (``to_json``) and as a report
(bench/report.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: The version of the JSON layout ``python -m bench`` writes.
SCHEMA_VERSION = 1

Cell = str | int | float | None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))


@dataclass
class Goal:
    text: str
    #: None when this run could not measure it (a tool or database was missing).
    met: bool | None
    detail: str


@dataclass
class Result:
    name: str
    title: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, title: str, columns: Sequence[str]) -> Table:
        made = Table(title, list(columns))
        self.tables.append(made)
        return made

    def metric(self, key: str, value: float) -> float:
        self.metrics[key] = float(value)
        return value

    def goal(self, text: str, met: bool | None, detail: str) -> None:
        self.goals.append(Goal(text, met, detail))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SCHEMA_VERSION
        return data
