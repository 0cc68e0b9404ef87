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

from lmforge.errors import UserError


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


def check_new_report(out: str | Path, name: str, files: Sequence[str] = ()) -> None:
    """Refuse, before any work is done, to write a report where one already is (`NAME.json`, or any of `files`)."""
    taken = [file for file in (f"{name}.json", *files) if (Path(out) / file).exists()]
    if taken:
        raise UserError(f"{Path(out) / taken[0]} already exists; choose another --out (reports are never replaced)")


def write_report(out: str | Path, name: str, report: dict[str, Any], rows: Sequence[dict[str, Any]],
                 echo: bool = True, extra: dict[str, str] | None = None) -> dict[str, Path]:
    """Write `OUT/NAME.json` (the report, with the rows), `OUT/NAME.md` (the table) and the `extra`
    files (file name -> text, e.g. predictions); print the table. Refuses to replace an existing report."""
    out = Path(out)
    table = format_table(rows)
    texts = {f"{name}.json": json.dumps({**report, "rows": list(rows)}, indent=2, default=str) + "\n",
             f"{name}.md": f"# {name}\n\n{table}\n", **(extra or {})}
    check_new_report(out, name, list(texts))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report directory {out}: {e.strerror}") from None
    for file, text in texts.items():
        partial = out / f".{file}.partial"
        partial.write_text(text, encoding="utf-8")
        partial.replace(out / file)
    if echo:
        print(table)
    return {"json": out / f"{name}.json", "table": out / f"{name}.md", **{file: out / file for file in extra or {}}}
