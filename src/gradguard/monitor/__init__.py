"""The training monitor: :func:`watch` and :class:`Monitor` (hooks, schedules, device buffers, replay)."""

from gradguard.monitor.monitor import DEFAULTS, Monitor, watch
from gradguard.monitor.schedule import every

__all__ = ["DEFAULTS", "Monitor", "every", "watch"]
