"""Zero-code monitoring: ``gradguard run train.py`` and ``gg.autowatch()`` watch an unmodified program.

Layout: ``discover`` (which module is the model), ``session`` (the hooks and documented patches that
record each step, and the guarded optimizer step), ``command`` (the ``gradguard run`` sub-command).
"""

from gradguard.attach.session import RUN_STATUSES, Session, autowatch

__all__ = ["RUN_STATUSES", "Session", "autowatch"]
