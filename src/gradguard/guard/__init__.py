"""The Guard: a guarded optimizer step (skip, roll back, back off, rescue), its snapshot store and its
optimizer wrapper. Design notes: docs/guard.md."""

from gradguard.guard.core import ACTIONS, SPIKE_SERIES, FindingSink, Guard, GuardEvent
from gradguard.guard.optimizer import GuardedOptimizer

__all__ = ["ACTIONS", "SPIKE_SERIES", "FindingSink", "Guard", "GuardEvent", "GuardedOptimizer"]
