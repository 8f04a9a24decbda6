"""The per-pass report of a pipeline run, printable as a table and serializable to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: time, whether it changed the graph, size and cost before and after, its own stats."""

    name: str
    seconds: float
    modified: bool
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    stats: dict
    max_abs_error: float | None = None  # vs the graph before the pass, when the manager compared outputs
    decisions: dict = field(default_factory=dict)  # layer or block -> what the pass did or why not (PassResult)


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _stats_text(stats: dict, limit: int = 60) -> str:
    text = ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Report:
    """Records of every pass in schedule order, plus how the model was captured."""

    capture: str = "unknown"
    records: list[PassRecord] = field(default_factory=list)

    def __str__(self) -> str:
        head = ("pass", "time", "modified", "params", "MACs", "max err", "stats")
        rows = [head]
        for r in self.records:
            rows.append((
                r.name,
                f"{r.seconds * 1e3:.1f} ms",
                "yes" if r.modified else "no",
                f"{_human(r.params_before)} -> {_human(r.params_after)}",
                f"{_human(r.macs_before)} -> {_human(r.macs_after)}",
                "-" if r.max_abs_error is None else f"{r.max_abs_error:.1e}",
                _stats_text(r.stats),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [f"captured with: {self.capture}"]
        for k, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def decisions_markdown(self) -> str:
        """Per pass, its per-layer decisions as a markdown table (empty when no pass made any)."""
        parts = []
        for r in self.records:
            if r.decisions:
                parts += [f"### {r.name}", "", "| layer | decision |", "|---|---|"]
                parts += [f"| `{name}` | {what} |" for name, what in r.decisions.items()]
                parts.append("")
        return "\n".join(parts).rstrip()

    def to_dict(self) -> dict:
        """JSON-ready form of the report."""
        return {"capture": self.capture, "passes": [asdict(r) for r in self.records]}
