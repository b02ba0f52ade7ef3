"""The explicit life cycle of a colocated generation engine.

::

    AWAKE ──sleep()──▶ ASLEEP ──wake_weights()──▶ WEIGHTS_ONLY ──wake()──▶ AWAKE
      │                   │                            │
      └─load_weights()─▶ UPDATING ◀──load_weights()────┘      (refused while ASLEEP)
                          │ ok: back where it came from
                          ├ bad input caught before sending (unknown name, wrong shape): STALE
                          └ the engine raised or hung: BROKEN

- generate() only when AWAKE (and not after a level-2 sleep discarded the weights until a push replaced them).
- On GPU, waking the weights before the KV cache lets the push land before the cache is re-allocated.
- STALE: part of the new weights went in; only a complete push is accepted.
- BROKEN: the engine's own reload failed or timed out; it cannot be trusted and must be recreated (restart the run;
  it resumes from its last checkpoint).
"""

from __future__ import annotations

import enum


class EngineState(str, enum.Enum):
    AWAKE = "awake"
    ASLEEP = "asleep"
    WEIGHTS_ONLY = "weights-only"  # weights resident, KV cache not yet re-allocated
    UPDATING = "updating"
    STALE = "stale"
    BROKEN = "broken"


class EngineError(RuntimeError):
    """A generation engine refused or failed an operation; the message says which and what to do."""


class EngineStateError(EngineError):
    """An operation the engine's current state does not allow (e.g. a weight push while asleep)."""


_HINTS = {
    EngineState.ASLEEP: "call wake_weights() (then load_weights) or wake() first",
    EngineState.WEIGHTS_ONLY: "call wake() to re-allocate the KV cache before generating",
    EngineState.UPDATING: "a weight push is in progress",
    EngineState.STALE: "a weight push stopped half-way; push the complete weights again",
}


class StateMachine:
    def __init__(self, name: str = "engine"):
        self.name = name
        self.state = EngineState.AWAKE
        self.reason = ""  # why the engine is STALE / BROKEN

    def require(self, action: str, *allowed: EngineState) -> None:
        if self.state in allowed:
            return
        if self.state is EngineState.BROKEN:
            raise EngineStateError(f"{self.name} cannot {action}: it is broken ({self.reason}). Recreate the engine "
                                   "(restart the run; it resumes from its last checkpoint)")
        why = f" ({self.reason})" if self.reason and self.state is EngineState.STALE else ""
        raise EngineStateError(f"{self.name} cannot {action} while {self.state.value}{why}; "
                               f"{_HINTS.get(self.state, 'allowed states: ' + ', '.join(s.value for s in allowed))}")

    def to(self, state: EngineState, reason: str = "") -> None:
        self.state = state
        self.reason = reason
