"""The job's phase -- waiting, training, finished -- and the transitions allowed between them.

A transition table in the manner of h11's `_state.py`: the core says where it goes,
and a move the table does not list raises `IllegalTransition` (a bug, never a remote
party's doing), so tests catch it instead of a silent wrong state.
"""

from __future__ import annotations

WAITING, TRAINING, FINISHED = "waiting", "training", "finished"

# from -> the phases it may move to
TRANSITIONS: dict[str, frozenset[str]] = {
    WAITING: frozenset({WAITING, TRAINING, FINISHED}),  # round 1 starts (or a restart finds it done)
    TRAINING: frozenset({WAITING, TRAINING, FINISHED}),  # a restart waits again until a round opens
    FINISHED: frozenset(),  # a finished job stays finished, across restarts too
}


class IllegalTransition(RuntimeError):
    """The core asked for a phase change the table does not allow."""


class JobPhase:
    def __init__(self, state: str = WAITING) -> None:
        if state not in TRANSITIONS:
            raise IllegalTransition(f"unknown job phase {state!r}")
        self.state = state

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def go(self, state: str) -> None:
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"job phase {self.state!r} cannot become {state!r}")
        self.state = state
