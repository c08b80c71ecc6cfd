"""The run's current curriculum stage: the one place it lives.

The :class:`~megatron_ct.config.schedule.Schedule` says which stage every iteration belongs to (a
function of the config); the :class:`StageTracker` holds the stage the run is in now. The
trainer's stage-start hook is the only writer (:meth:`StageTracker.enter`); the freeze plan and
the LR scheduler read it. It is a checkpoint component: the stage a checkpoint was saved in is
recorded, so a resume into a schedule whose stages were edited since says what changed instead
of silently switching stage.
"""

from __future__ import annotations

import logging
from typing import Any

from megatron_ct.config.schedule import Schedule, Stage

log = logging.getLogger("megatron_ct")


class StageTracker:
    """The current stage (None before the run enters its first) and the one it was saved in."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.current: Stage | None = None
        self.saved: dict[str, Any] | None = None
        """The stage record of the checkpoint this run resumed from, if any."""

    def enter(self, stage: Stage) -> None:
        self.current = stage

    def state_dict(self) -> dict[str, Any]:
        st = self.current
        if st is None:
            return {}
        return {"index": st.index, "name": st.name, "start_iter": st.start_iter, "end_iter": st.end_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state) or None

    def resume_note(self, iteration: int) -> str | None:
        """What changed between the checkpoint's stage and the schedule's at ``iteration``, if anything."""
        saved = self.saved
        if not saved:
            return None
        now = self.schedule.stage_at(iteration)
        was = f"stage {saved['name']!r} (iterations {saved['start_iter'] + 1}-{saved['end_iter'] or 'end'})"
        if saved["name"] != now.name:
            return (
                f"the checkpoint was saved in {was}; the schedule now puts iteration {iteration + 1} in stage "
                f"{now.name!r}: continuing there"
            )
        if (saved["start_iter"], saved["end_iter"]) != (now.start_iter, now.end_iter):
            return (
                f"the checkpoint was saved in {was}; the schedule now runs it over iterations "
                f"{now.start_iter + 1}-{now.end_iter or 'end'}"
            )
        return None
