"""Synthetic episode time series in the mimic3-benchmarks ``episode{N}_timeseries.csv`` format.

One row per distinct chart time, sorted; ``Hours`` = (CHARTTIME - INTIME) in hours as a full
float repr; values are the strings the benchmark's extraction writes (design/MIMIC_FORMATS.md
section 1a): HR/RR ints, SBP/DBP/SpO2/Glucose floats such as ``49.0``, MBP ``67`` (CareVue) or
a float32 repr such as ``68.666702270507812`` (MetaVision), Temperature converted from
Fahrenheit with many digits, FiO2 as a fraction, CRR ``0.0``/``1.0``, GCS as text in the
spelling of the stay's DBSOURCE (CareVue words and a total; MetaVision numbered, no total).

Charting follows an ICU day: vitals on the clock hour, GCS/temperature/CRR every four hours,
glucose and blood gases at odd minutes, height/weight on admission. The stay's EHR view
``v = (severity, respiratory, cardiac, metabolic)`` shifts the distributions: e.g. heart rate
up with severity and cardiac risk, SpO2 down and FiO2 up with respiratory risk, GCS down with
severity, glucose up and pH down with metabolic risk.
"""

from __future__ import annotations

import math

import numpy as np

from omnifuse_model.data.ehr.discretizer import CHANNELS, EPISODE_HEADER, EPS
from simulation.synthetic_mimic.cohort import IHM_HOURS, StayPlan, SubjectPlan

HEADER_LINE = ",".join(EPISODE_HEADER)
_COL = {channel: i for i, channel in enumerate(CHANNELS)}
_GCS_TOTAL = _COL["Glascow coma scale total"]
_GCS_TEXT = tuple(
    _COL[f"Glascow coma scale {part}"]
    for part in ("eye opening", "motor response", "verbal response")
)
_CRR = _COL["Capillary refill rate"]
GCS_CHANNELS = {
    "eye": "Glascow coma scale eye opening",
    "motor": "Glascow coma scale motor response",
    "verbal": "Glascow coma scale verbal response",
}

# Score -> spelling per charting system; verbal 0 = intubated (scored 1 in the total).
GCS_SPELLINGS: dict[str, dict[str, dict[int, str]]] = {
    "carevue": {
        "eye": {1: "None", 2: "To Pain", 3: "To Speech", 4: "Spontaneously"},
        "motor": {
            1: "No response",
            2: "Abnormal extension",
            3: "Abnormal Flexion",
            4: "Flex-withdraws",
            5: "Localizes Pain",
            6: "Obeys Commands",
        },
        "verbal": {
            0: "No Response-ETT",
            1: "No Response",
            2: "Incomprehensible sounds",
            3: "Inappropriate Words",
            4: "Confused",
            5: "Oriented",
        },
    },
    "metavision": {
        "eye": {1: "1 No Response", 2: "2 To pain", 3: "3 To speech", 4: "4 Spontaneously"},
        "motor": {
            1: "1 No Response",
            2: "2 Abnorm extensn",
            3: "3 Abnorm flexion",
            4: "4 Flex-withdraws",
            5: "5 Localizes Pain",
            6: "6 Obeys Commands",
        },
        "verbal": {
            0: "1.0 ET/Trach",
            1: "1 No Response",
            2: "2 Incomp sounds",
            3: "3 Inapprop words",
            4: "4 Confused",
            5: "5 Oriented",
        },
    },
}

EpisodeLines = list[tuple[float, str]]
"""``(hours, csv line without newline)`` per row, sorted by hours."""


def _ints(values: np.ndarray) -> list[str]:
    """HR/RR style: ``82``."""
    return [str(v) for v in np.rint(values).astype(int).tolist()]


def _dot0(values: np.ndarray) -> list[str]:
    """SBP/DBP/SpO2/Glucose style: ``49.0``."""
    return [f"{v}.0" for v in np.rint(values).astype(int).tolist()]


def _float32(values: np.ndarray) -> list[str]:
    """MetaVision style: float32 printed with 17 significant digits (``67``, ``68.6667...``)."""
    return [f"{v:.17g}" for v in values.astype(np.float32).astype(float).tolist()]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class _Chart:
    """Cells keyed by seconds since INTIME; a chart time is one row."""

    def __init__(self) -> None:
        self.cells: dict[int, list[str]] = {}

    def put(self, second: int, channel: str, value: str) -> None:
        row = self.cells.get(second)
        if row is None:
            row = self.cells[second] = [""] * len(CHANNELS)
        row[_COL[channel]] = value

    def put_series(self, seconds: np.ndarray, channel: str, values: list[str]) -> None:
        column, cells = _COL[channel], self.cells
        for second, value in zip(seconds.tolist(), values, strict=True):
            row = cells.get(second)
            if row is None:
                row = cells[second] = [""] * len(CHANNELS)
            row[column] = value

    def lines(self) -> EpisodeLines:
        out = []
        for second in sorted(self.cells):
            hours = second / 60.0 / 60  # as the benchmark computes it from seconds
            out.append((hours, repr(hours) + "," + ",".join(self.cells[second])))
        return out


def gcs_scores(
    totals: np.ndarray, intubated: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eye, motor, verbal) scores whose sum is the total; verbal 0 = intubated (scores 1).

    An intubated patient's verbal response is fixed at "ET", so the total is capped at 11.
    The deficit below the maximum is shared: verbal first, then eye, motor takes the rest.
    """
    totals = np.where(intubated, np.minimum(totals, 11), totals)
    deficit = np.where(intubated, 11 - totals, 15 - totals)
    verbal_cap = np.where(intubated, 0, 4)
    verbal = np.minimum(rng.binomial(deficit, 0.45), verbal_cap)
    eye = np.minimum(rng.binomial(deficit - verbal, 0.6), 3)
    motor = deficit - verbal - eye
    over = np.maximum(motor - 5, 0)
    motor -= over
    to_verbal = np.minimum(over, verbal_cap - verbal)
    verbal += to_verbal
    eye += over - to_verbal  # fits: the three capacities add up to the largest deficit
    return 4 - eye, 6 - motor, np.where(intubated, 0, 5 - verbal)


def _chart_gcs(chart: _Chart, seconds: np.ndarray, level: float, stay: StayPlan, vent: bool, rng):
    spell = GCS_SPELLINGS[stay.dbsource]
    n = len(seconds)
    intubated = (rng.random(n) < 0.85) & vent
    totals = np.clip(np.rint(level + rng.normal(0, 1.0, n)), 3, 15).astype(int)
    eye, motor, verbal = gcs_scores(totals, intubated, rng)
    for part, scores in (("eye", eye), ("motor", motor), ("verbal", verbal)):
        name = GCS_CHANNELS[part]
        chart.put_series(seconds, name, [spell[part][v] for v in scores.tolist()])
    if stay.dbsource == "carevue":  # MetaVision charts no total
        chart.put_series(
            seconds, "Glascow coma scale total", _ints(eye + motor + np.maximum(verbal, 1))
        )


def episode_lines(stay: StayPlan, subject: SubjectPlan, seed: int) -> EpisodeLines:
    """Every row of the stay's root ``episode{N}_timeseries.csv``, including pre-INTIME rows."""
    episode = _Episode(stay, subject, np.random.default_rng([seed, 2, stay.index]))
    episode.vitals()
    episode.every_four_hours()
    episode.labs()
    episode.body_size()
    return episode.chart.lines()


class _Episode:
    """Charting of one stay; times are whole clock minutes, in seconds since INTIME."""

    def __init__(self, stay: StayPlan, subject: SubjectPlan, rng: np.random.Generator) -> None:
        self.stay, self.subject, self.rng, self.chart = stay, subject, rng, _Chart()
        self.sev, self.resp, self.card, self.met = (float(x) for x in stay.views["ehr"])
        self.carevue = stay.dbsource == "carevue"
        self.los = stay.los_seconds
        past_hour = stay.intime.minute * 60 + stay.intime.second
        hourly = np.arange((3600 - past_hour) % 3600, self.los + 1, 3600)
        # Admission row at a whole minute shortly after INTIME (LOS >= 4 h, so it fits).
        self.first = (60 - stay.intime.second) % 60 + 60 * int(rng.integers(2, 30))
        self.times = np.concatenate(([self.first], hourly))
        self.vent = rng.random() < _sigmoid(1.2 * self.resp + 1.0 * self.sev - 1.2)

    def _mask(self, n: int, p: float) -> np.ndarray:
        return self.rng.random(n) < p

    def vitals(self) -> None:
        """Hourly HR, RR, blood pressures, SpO2."""
        rng, times, n, put = self.rng, self.times, len(self.times), self.chart.put_series
        sev, resp, card = self.sev, self.resp, self.card
        hr = np.clip(86 + 9 * sev + 6 * card + rng.normal(0, 7, n), 30, 220)
        at = self._mask(n, 0.95)
        put(times[at], "Heart Rate", _ints(hr[at]))
        rr = np.clip(19 + 2.5 * resp + 1.5 * sev + rng.normal(0, 3, n), 5, 50)
        at = self._mask(n, 0.9)
        put(times[at], "Respiratory rate", _ints(rr[at]))
        sbp = np.rint(np.clip(120 - 10 * sev + 3 * card + rng.normal(0, 10, n), 60, 220))
        dbp = np.rint(np.clip(60 - 5 * sev + rng.normal(0, 7, n), 25, 120))
        at = self._mask(n, 0.85)
        put(times[at], "Systolic blood pressure", _dot0(sbp[at]))
        put(times[at], "Diastolic blood pressure", _dot0(dbp[at]))
        at &= self._mask(n, 0.95)
        mbp = (sbp[at] + 2 * dbp[at]) / 3
        put(times[at], "Mean blood pressure", _ints(mbp) if self.carevue else _float32(mbp))
        spo2 = np.clip(97 - 1.5 * resp - 0.5 * sev + rng.normal(0, 1.5, n), 70, 100)
        at = self._mask(n, 0.9)
        put(times[at], "Oxygen saturation", _dot0(spo2[at]))
        if rng.random() < 0.15:  # charted before INTIME: negative Hours in root episodes
            second = -(60 * int(rng.integers(5, 120)) + self.stay.intime.second)
            self.chart.put(second, "Heart Rate", _ints(hr[:1])[0])

    def every_four_hours(self) -> None:
        """Temperature, GCS, capillary refill and (if ventilated) FiO2."""
        rng, times, put = self.rng, self.times[::4], self.chart.put_series
        n = len(times)
        at = self._mask(n, 0.9)
        celsius = 36.9 + 0.35 * self.sev + 0.25 * self.resp + rng.normal(0, 0.35, at.sum())
        put(times[at], "Temperature", _temperatures(celsius, rng))
        at = self._mask(n, 0.85)
        _chart_gcs(self.chart, times[at], 14.0 - 2.5 * self.sev, self.stay, self.vent, rng)
        at = self._mask(n, 0.7 if self.carevue else 0.1)
        refill = rng.random(at.sum()) < _sigmoid(1.5 * self.sev - 2.5)
        put(times[at], "Capillary refill rate", ["1.0" if r else "0.0" for r in refill.tolist()])
        if self.vent:
            percent = 40 + 10 * self.resp + 5 * self.sev + rng.normal(0, 8, n)
            fio2 = np.clip(np.rint(percent / 5) * 5, 21, 100).astype(int)
            at = self._mask(n, 0.9)
            put(times[at], "Fraction inspired oxygen", [repr(v / 100.0) for v in fio2[at].tolist()])

    def labs(self) -> None:
        """Glucose about every 6 h, blood gases every 8 h if ventilated, odd minutes."""
        rng, sev, met, put = self.rng, self.sev, self.met, self.chart.put_series
        labs = self.times[::6] + 60 * rng.integers(1, 59, len(self.times[::6]))
        labs = labs[(labs <= self.los) & self._mask(len(labs), 0.8)]
        glucose = np.clip(130 + 25 * met + 8 * sev + rng.normal(0, 25, len(labs)), 40, 600)
        put(labs, "Glucose", _dot0(glucose))
        if self.vent:
            gases = self.times[::8] + 60 * rng.integers(1, 59, len(self.times[::8]))
            gases = gases[(gases <= self.los) & self._mask(len(gases), 0.7)]
            ph = np.clip(
                7.39 - 0.035 * sev - 0.03 * met + rng.normal(0, 0.03, len(gases)), 6.8, 7.7
            )
            put(gases, "pH", [repr(round(v, 2)) for v in ph.tolist()])
        if rng.random() < 0.3:  # urine pH, which the benchmark maps to the same variable
            minute = int(rng.integers(0, self.los // 60))
            second = 60 * minute + (60 - self.stay.intime.second) % 60
            self.chart.put(second, "pH", repr(float(rng.choice([5.0, 5.5, 6.0, 6.5, 7.0]))))

    def body_size(self) -> None:
        """Height and weight on admission, weight about daily."""
        rng, subject, carevue = self.rng, self.subject, self.carevue
        if rng.random() < 0.5:
            self.chart.put(self.first, "Height", _height(subject.height_cm, carevue))
        if rng.random() < 0.8:
            self.chart.put(self.first, "Weight", _weight(subject.weight_kg, carevue))
        for second in self.times[24::24].tolist():
            if rng.random() < 0.4:
                weight = _weight(subject.weight_kg + rng.normal(0, 1.5), carevue)
                self.chart.put(second, "Weight", weight)


def _temperatures(celsius: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Mostly charted in Fahrenheit (float32) and converted by the benchmark: many digits."""
    fahrenheit = rng.random(len(celsius)) < 0.75
    out = []
    for c, f in zip(celsius.tolist(), fahrenheit.tolist(), strict=True):
        if f:
            charted = float(np.float32(round(c * 9.0 / 5.0 + 32.0, 1)))
            out.append(repr((charted - 32) * 5.0 / 9))
        else:
            out.append(repr(round(c, 1)))
    return out


def _height(cm: float, carevue: bool) -> str:
    if carevue:  # charted in inches
        return repr(round(cm / 2.54) * 2.54)
    return f"{round(cm)}.0"


def _weight(kg: float, carevue: bool) -> str:
    if carevue:
        return repr(round(kg, 1))
    return _float32(np.array([round(kg, 1)]))[0]


def ihm_lines(stay: StayPlan, lines: EpisodeLines) -> EpisodeLines | None:
    """Rows the benchmark's IHM script copies, or None when the stay is not in the task."""
    if not 24.0 * stay.los >= IHM_HOURS - EPS:
        return None
    kept = [row for row in lines if -EPS < row[0] < IHM_HOURS + EPS]
    return kept or None


def phenotyping_lines(stay: StayPlan, lines: EpisodeLines) -> EpisodeLines | None:
    """Rows the benchmark's phenotyping script copies (``-eps < t < 24 LOS + eps``)."""
    kept = [row for row in lines if -EPS < row[0] < 24.0 * stay.los + EPS]
    return kept or None


def episode_text(lines: EpisodeLines) -> str:
    return HEADER_LINE + "\n" + "".join(line + "\n" for _, line in lines)


# --- messy records --------------------------------------------------------------------------

EPISODE_MESSY_KINDS = (
    "gcs_total_float",
    "unknown_spelling",
    "blank_row",
    "unsorted_hours",
    "truncated_file",
)


def messy_episode(
    lines: EpisodeLines, kind: str, rng: np.random.Generator
) -> tuple[str, str] | None:
    """``(file text, what was done)`` with one ``kind`` of problem, or None if not applicable.

    Line numbers in the description count the header as line 1.
    """
    rows = [line for _, line in lines]
    if kind in ("gcs_total_float", "unknown_spelling"):
        columns = (_GCS_TOTAL,) if kind == "gcs_total_float" else (*_GCS_TEXT, _CRR)
        cells = [
            (i, c)
            for i, row in enumerate(rows)
            for c, value in enumerate(row.split(",")[1:])
            if c in columns and value
        ]
        if not cells:
            return None
        i, c = cells[int(rng.integers(len(cells)))]
        fields = rows[i].split(",")
        old = fields[c + 1]
        if kind == "gcs_total_float":
            new = old + ".0"
        elif c == _CRR:
            new = old.split(".")[0]
        else:
            new = old.lower()
        fields[c + 1] = new
        rows[i] = ",".join(fields)
        detail = f"line {i + 2}: {CHANNELS[c]!r} {old!r} -> {new!r}"
    elif kind == "blank_row":
        i = int(rng.integers(1, len(rows))) if len(rows) > 1 else 0
        rows.insert(i, "")
        detail = f"empty line inserted as line {i + 2}"
    elif kind == "unsorted_hours":
        if len(rows) < 2:
            return None
        i = int(rng.integers(0, len(rows) - 1))
        rows[i], rows[i + 1] = rows[i + 1], rows[i]
        detail = f"lines {i + 2} and {i + 3} swapped"
    elif kind == "truncated_file":
        if not rows:
            return None
        keep = int(rng.integers(1, len(EPISODE_HEADER)))
        text = HEADER_LINE + "\n" + "".join(row + "\n" for row in rows[:-1])
        text += ",".join(rows[-1].split(",")[:keep])
        return text, f"line {len(rows) + 1} cut after {keep} of {len(EPISODE_HEADER)} fields"
    else:
        raise ValueError(f"messy kind {kind!r} does not apply to episode files")
    return HEADER_LINE + "\n" + "".join(row + "\n" for row in rows), detail
