"""Evaluation reports: one JSON file for programs and one readable table for people, written together.

    rows = [{"system": "lmforge (LoRA)", "accuracy": 0.84}, {"system": "TF-IDF + LR", "accuracy": 0.76}]
    paths = write_report("runs/eval", "classify", report_dict, rows)   # report.json + report.md, printed too

Every task's evaluation returns a plain dict (its numbers, the data, the model, the time taken) and
a list of rows that compare systems (the model against a baseline); `write_report` writes both and
prints the table, so the CLI and the Python API give the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `rows` (columns: the union of the keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
        return str(value) if value is not None else ""

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: str | Path, name: str, report: dict[str, Any], rows: Sequence[dict[str, Any]],
                 echo: bool = True) -> dict[str, Path]:
    """Write `OUT/NAME.json` (the report, with the rows) and `OUT/NAME.md` (the table); print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    paths = {"json": out / f"{name}.json", "table": out / f"{name}.md"}
    for path, text in ((paths["json"], json.dumps({**report, "rows": list(rows)}, indent=2, default=str)),
                       (paths["table"], f"# {name}\n\n{table}\n")):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text + "\n", encoding="utf-8")
        partial.replace(path)
    if echo:
        print(table)
    return paths
