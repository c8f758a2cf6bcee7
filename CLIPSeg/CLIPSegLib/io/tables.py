"""CSV tables a user gives (``image,mask,phrase[,slices]`` for training, fine-tuning, calibration and evaluation;
a label table ``LabelValue,Name`` beside a label map): read and checked in one place.

A table is UTF-8 text (a byte-order mark, as Excel writes it, is tolerated) with a header row. Header names and
cells are taken without surrounding spaces. Rows whose cells are all empty (trailing ``,,`` lines) are skipped.
Path cells are resolved against the CSV's own folder (an absolute path stays as it is), so a table can be moved
with its files. Every problem is an ``InputError`` that names the file, the line (1 = the header) and the column.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# What to write into an empty cell of a column, for the error message.
_FILL = {
    "image": "give the image file (a path relative to the CSV's folder, or an absolute path)",
    "mask": "give the mask file (a path relative to the CSV's folder, or an absolute path)",
    "phrase": "name the finding, e.g. \"thyroid nodule\" or \"white matter\"",
}


@dataclass(frozen=True)
class TableRow:
    """One data row. ``line``: its line number in the file (the header is line 1; a quoted cell spanning lines
    counts its last line); ``cells``: column -> text, stripped, ``""`` for an empty or missing cell; ``where``:
    ``"<table> line <n>"`` to start an error message with."""

    line: int
    cells: dict
    folder: Path
    where: str

    def __getitem__(self, column: str) -> str:
        return self.cells.get(column, "")

    def get(self, column: str, default=None):
        value = self.cells.get(column, "")
        return value if value else default

    def path(self, column: str) -> Path:
        """The file named in ``column``, resolved against the CSV's folder."""
        return self.folder / self.cells[column]


def read_table(path, required=("image", "mask", "phrase"), optional=(), files=(), name: str | None = None
               ) -> list[TableRow]:
    """Read the CSV at ``path`` -> its data rows (``TableRow``), at least one.

    ``required``: columns the header must have and whose cells must not be empty; ``optional``: columns that may be
    absent or empty (listed in messages, e.g. ``slices``); other columns are kept as they are. ``files``: columns
    (among ``required``) naming files that must exist, checked here so a missing file is named with its line before
    any work. ``name``: how messages call the table (e.g. ``"--data table.csv"``; default the path). Raises
    ``InputError`` for a missing or non-UTF-8 file, a header without the required columns (naming the missing
    ones), a column named twice, no data row, a row with more cells than the header (an unquoted comma), an empty
    required cell (naming line and column) and a missing file."""
    path = Path(path)
    name = name or str(path)
    columns = ",".join(list(required) + [f"[{c}]" for c in optional])
    if not path.is_file():
        raise InputError(f"{name}: no such file; give a CSV with columns {columns}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            lines = [(reader.line_num, cells) for cells in reader]
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); save it as \"CSV UTF-8\"") from e
    except csv.Error as e:
        raise InputError(f"{name} is not a readable CSV table: {e}") from e
    if not header or not any(h.strip() for h in header):
        raise InputError(f"{name} is empty; it needs a header row with columns {columns} and at least one row")
    header = [h.strip() for h in header]
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:
        raise InputError(f"{name}: the header names the column {', '.join(twice)} more than once; keep one of each")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{name}: the header {','.join(header)} lacks the column{'s' * (len(missing) > 1)} "
                         f"{', '.join(missing)}; the table needs columns {columns}")
    rows = []
    for line, cells in lines:
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue
        where = f"{name} line {line}"
        if len(cells) > len(header):
            raise InputError(f"{where} has {len(cells)} cells but the header has {len(header)} columns; put a cell "
                             f"that holds a comma in double quotes (\"left lobe, upper pole\")")
        values = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        for column in required:
            if not values[column]:
                raise InputError(f"{where}: the {column} cell is empty; {_FILL.get(column, 'fill it in')}")
        row = TableRow(line, values, path.parent, where)
        for column in files:
            if not row.path(column).is_file():
                raise InputError(f"{where}: {column} {row.path(column)} does not exist; check the path (relative "
                                 f"to the CSV's folder {path.parent})")
        rows.append(row)
    if not rows:
        raise InputError(f"{name} has a header but no rows; add one row per mask with columns {columns}")
    return rows
