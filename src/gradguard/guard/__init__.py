"""The Guard: a guarded optimizer step (skip, roll back, back off, rescue), with its step measurement, its
history of applied steps, its events, its snapshot store and its optimizer wrapper. Design notes:
docs/guard.md."""

from gradguard.guard.core import ACTIONS, SPIKE_SERIES, FindingSink, Guard, GuardEvent, Stateful
from gradguard.guard.optimizer import GuardedOptimizer

__all__ = ["ACTIONS", "SPIKE_SERIES", "FindingSink", "Guard", "GuardEvent", "GuardedOptimizer", "Stateful"]
