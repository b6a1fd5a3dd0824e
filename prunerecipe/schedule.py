"""Schedule arithmetic: when a scheduled step prunes, and to what target.

Events fall at ``start, start + every, ...`` up to ``end``; ``end`` itself is always an
event, so the final target is reached on time even when ``end - start`` is not a
multiple of ``every``. At event ``t`` the target sparsity is (Zhu & Gupta 2017)

    s(t) = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** p

with ``p = 3`` for ``cubic`` and ``p = 1`` for ``linear``; ``constant`` targets ``s_f``
from the first event. With ``end == start`` the single event targets ``s_f``.
"""

from __future__ import annotations

from typing import NamedTuple

from .spec import Schedule, Step

_POWERS = {"cubic": 3, "linear": 1}


def event_times(schedule: Schedule) -> list[int]:
    """Every event of a schedule, in order (``end`` included)."""
    times = list(range(schedule.start, schedule.end + 1, schedule.every))
    if not times or times[-1] != schedule.end:
        times.append(schedule.end)
    return times


def target_at(schedule: Schedule, final: float, t: int) -> float:
    """Target sparsity at event ``t`` for a final sparsity ``final``."""
    if schedule.curve == "constant" or schedule.end == schedule.start:
        return final
    progress = min(max((t - schedule.start) / (schedule.end - schedule.start), 0.0), 1.0)
    return final + (schedule.initial_sparsity - final) * (1.0 - progress) ** _POWERS[schedule.curve]


class Event(NamedTuple):
    """One pruning event of a scheduled step: at ``time`` (in ``unit``), reach ``sparsity`` or apply ``amount``."""

    step: int
    unit: str
    time: int
    sparsity: float | None
    amount: int | float | None


def step_events(step: Step) -> list[Event]:
    """The events of a scheduled step (empty for an unscheduled one)."""
    if step.schedule is None:
        return []
    schedule = step.schedule
    return [
        Event(
            step.index,
            schedule.unit,
            t,
            target_at(schedule, step.sparsity, t) if step.sparsity is not None else None,
            step.amount if step.sparsity is None else None,
        )
        for t in event_times(schedule)
    ]
