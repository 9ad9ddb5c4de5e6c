"""The scalar curves of a run directory, whichever logger wrote them: a CSVLogger's metrics.csv,
or TensorBoard event files where a log directory has no CSV. Every log directory under the run
counts (a resumed fit adds a version)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

Curves = dict[str, list[tuple[int, float]]]

EVENTS_GLOB = "events.out.tfevents.*"


def _csv_curves(path: Path) -> Curves:
    curves: Curves = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row["step"]))
            except (KeyError, TypeError, ValueError):
                continue
            for key, value in row.items():
                if key == "step":
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if not math.isnan(number):
                    curves[key].append((step, number))
    return curves


def _event_curves(log_dir: Path) -> Curves:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    curves: Curves = defaultdict(list)
    for path in sorted(log_dir.glob(EVENTS_GLOB)):
        events = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags()[SCALARS]:
            curves[tag].extend((e.step, e.value) for e in events.Scalars(tag))
    return curves


def log_dirs(run_root: Path) -> list[Path]:
    """The directories under run_root holding a metrics.csv or TensorBoard event files."""
    found = {p.parent for p in run_root.rglob("metrics.csv")} | {p.parent for p in run_root.rglob(EVENTS_GLOB)}
    return sorted(found)


def read_curves(run_root: Path, source: str = "auto") -> Curves:
    """{metric: [(step, value), ...] by step} over every log directory under run_root.

    source: "auto" (a directory's metrics.csv, else its event files), "csv" or "tensorboard"."""
    if source not in ("auto", "csv", "tensorboard"):
        raise ValueError(f"source must be auto, csv or tensorboard, not {source!r}")
    curves: Curves = defaultdict(list)
    for log_dir in log_dirs(Path(run_root)):
        csv_file = log_dir / "metrics.csv"
        if source == "csv" or (source == "auto" and csv_file.is_file()):
            found = _csv_curves(csv_file) if csv_file.is_file() else {}
        else:
            found = _event_curves(log_dir)
        for key, points in found.items():
            curves[key].extend(points)
    return {key: sorted(points, key=lambda p: p[0]) for key, points in sorted(curves.items())}


def curve_rows(curves: Curves) -> list[dict[str, float]]:
    """The curves as rows {"step": s, metric: value}, one a point, ordered by step."""
    rows = [{"step": float(step), key: value} for key, points in curves.items() for step, value in points]
    return sorted(rows, key=lambda r: r["step"])
