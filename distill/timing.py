"""Wall time of the named stages of a run (data, teacher, each student, each evaluation, export
and benchmark, report): what ``report.json`` records under ``timings`` and the summary line says."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class StageClock:
    """Seconds per stage in the order the stages first ran (a repeated name adds up), and the
    wall time since the clock was made. Owned by the function that runs the stages; what it
    measured leaves it by :meth:`timings`."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Record ``seconds`` measured elsewhere (e.g. returned by a function that timed its parts)."""
        self._stages[name] = self._stages.get(name, 0.0) + seconds

    def timings(self) -> dict:
        """``{"stages_s": {name: seconds}, "total_s": wall time so far, "other_s": total - stages}``,
        rounded to milliseconds."""
        total = time.perf_counter() - self._started
        stages = {name: round(seconds, 3) for name, seconds in self._stages.items()}
        return {"stages_s": stages, "total_s": round(total, 3), "other_s": round(total - sum(self._stages.values()), 3)}


def summary_line(timings: dict, top: int = 4) -> str:
    """One line: the total and the ``top`` longest stages with their share, e.g.
    ``time 52.1 s: teacher training 30.2 s (58%), student 6.1 s (12%), ...``."""
    total = timings["total_s"]
    longest = sorted(timings["stages_s"].items(), key=lambda kv: -kv[1])[:top]
    parts = [f"{name} {seconds:.1f} s ({seconds / total:.0%})" for name, seconds in longest] if total > 0 else []
    rest = total - sum(seconds for _, seconds in longest)
    return f"time {total:.1f} s: " + ", ".join(parts + [f"the rest {rest:.1f} s"])
