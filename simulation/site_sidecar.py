"""Subject -> site from a sidecar table: `omnifuse partition` with ``site_sidecar``.

A sidecar is any CSV outside the MIMIC layouts with a ``subject_id`` column and a column naming
each subject's source (e.g. the synthetic writer's ``synthetic_stays.csv`` and its ``hospital``
column), so a partition can follow where the data came from instead of drawing sites at
random. Every training subject must be listed, with one source only, and every source must be
a site of the partition.
"""

from __future__ import annotations

import csv
from pathlib import Path


def read_sidecar(path: Path, column: str) -> dict[int, str]:
    """``subject_id -> value of column``; errors name the file, line and value."""
    if not path.is_file():
        raise FileNotFoundError(f"site_sidecar {path}: no such file")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"subject_id", column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"site_sidecar {path}: no column(s) {sorted(missing)}; expected 'subject_id' "
                f"and the site column '{column}', found {reader.fieldnames}"
            )
        sources: dict[int, str] = {}
        for line, row in enumerate(reader, start=2):
            try:
                subject = int(row["subject_id"])
            except ValueError:
                raise ValueError(
                    f"site_sidecar {path}, line {line}: subject_id is {row['subject_id']!r}, "
                    "expected an integer"
                ) from None
            value = row[column]
            if sources.setdefault(subject, value) != value:
                raise ValueError(
                    f"site_sidecar {path}, line {line}: subject {subject} is at "
                    f"'{sources[subject]}' and at '{value}' ({column}); a subject has one site"
                )
    return sources


def sidecar_assignment(
    path: Path, column: str, subjects: list[int], site_names: list[str], min_subjects: int
) -> dict[int, int]:
    """Subject -> index into ``site_names`` for each of ``subjects``, as the sidecar says."""
    sources = read_sidecar(path, column)
    index = {name: i for i, name in enumerate(site_names)}
    assignment: dict[int, int] = {}
    for subject in subjects:
        if subject not in sources:
            raise ValueError(f"site_sidecar {path}: subject {subject} is not listed")
        if sources[subject] not in index:
            raise ValueError(
                f"site_sidecar {path}: subject {subject} has {column} "
                f"'{sources[subject]}', which is not a site; expected one of {site_names}"
            )
        assignment[subject] = index[sources[subject]]
    counts = {name: 0 for name in site_names}
    for site in assignment.values():
        counts[site_names[site]] += 1
    small = {name: n for name, n in counts.items() if n < min_subjects}
    if small:
        raise ValueError(
            f"site_sidecar {path}: sites with fewer than {min_subjects} subjects: {small}"
        )
    return assignment
