"""The Guard's snapshot store: one committed rollback target and at most one candidate awaiting validation.

Three places a snapshot can live (``SNAPSHOT_MODES``):

* ``"device"``: copies on the tensors' own devices (fastest restore; costs accelerator memory);
* ``"host"``: copies in host memory, pinned when CUDA is available so the device-to-host copy is queued
  with ``non_blocking=True`` and the step does not wait for it (the store waits only before reading a
  copy back); on a CPU-only machine these are plain copies;
* ``"disk"``: host copies written with ``torch.save`` at each commit (atomically) and read back with
  ``torch.load(weights_only=True)``, so a snapshot file can never run code.

:func:`choose_mode` picks ``"device"`` or ``"host"`` by size (docs/guard.md). Only the ``bulk`` entries
(the model's tensors and the optimizer's state) move to the host; the small ones (clip policies, windows,
scaler, scheduler) stay where they are, so their own ``load_state_dict`` gets tensors on their devices.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import ConfigError, StateError

__all__ = ["DEVICE_SHARE", "SNAPSHOT_MODES", "SnapshotStore", "choose_mode"]

SNAPSHOT_MODES = ("device", "host", "disk")
#: The share of an accelerator's memory that two device snapshots (committed + candidate) may take.
DEVICE_SHARE = 0.1
#: Entries of a snapshot that the host and disk modes keep off the accelerator.
BULK = ("model", "optimizer")


def choose_mode(tensors: Iterable[Tensor], *, state_factor: float = 2.0) -> str:
    """``"device"`` when two snapshots fit in :data:`DEVICE_SHARE` of every accelerator's memory, else ``"host"``.

    A snapshot's size is estimated before the optimizer has any state, as the tensors' bytes times
    ``1 + state_factor`` (Adam keeps two moments per parameter). On a CPU-only model host and device
    memory are the same, so ``"device"`` (plain copies) is chosen.
    """
    sizes: dict[torch.device, int] = {}
    for t in tensors:
        sizes[t.device] = sizes.get(t.device, 0) + t.numel() * t.element_size()
    for device, size in sizes.items():
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            if 2 * size * (1.0 + state_factor) > DEVICE_SHARE * total:
                return "host"
    return "device"


def _copy_into(dst: Any, src: Any, host: bool, pin: bool) -> Any:
    """A deep copy of ``src`` (nested dicts, lists and tuples of tensors and plain values), written into the
    tensor at the same place in ``dst`` when shape, dtype and device match; on the host when ``host``."""
    if isinstance(src, Tensor):
        device = torch.device("cpu") if host else src.device
        if (
            isinstance(dst, Tensor)
            and dst.shape == src.shape
            and dst.dtype == src.dtype
            and dst.device == device
            and dst.layout == src.layout == torch.strided
        ):
            return dst.copy_(src, non_blocking=pin)
        if not host:
            return src.detach().clone()
        out = torch.empty(src.shape, dtype=src.dtype, device=device, pin_memory=pin and src.layout == torch.strided)
        return out.copy_(src.detach(), non_blocking=pin)
    if type(src) is dict:
        old = dst if isinstance(dst, dict) else {}
        return {k: _copy_into(old.get(k), v, host, pin) for k, v in src.items()}
    if type(src) in (list, tuple):
        slots = dst if isinstance(dst, list | tuple) and len(dst) == len(src) else [None] * len(src)
        return type(src)(_copy_into(a, b, host, pin) for a, b in zip(slots, src, strict=True))
    return copy.deepcopy(src)


class SnapshotStore:
    """Copies of training state: the committed rollback target, and a candidate that becomes it once
    validated (:meth:`promote`) or is dropped (:meth:`discard`).

    Captures write into the tensors of the last snapshot replaced or dropped (the *spare*) when shapes
    match: allocating a fresh copy of the model and its optimizer state each time costs about twice the
    copy itself. In disk mode only the candidate stays in memory, until it is written.

    Args:
        mode: one of :data:`SNAPSHOT_MODES`.
        path: the snapshot file, required with ``mode="disk"`` and refused otherwise.
    """

    def __init__(self, mode: str, *, path: str | os.PathLike[str] | None = None) -> None:
        if mode not in SNAPSHOT_MODES:
            raise ConfigError(f"snapshot={mode!r} is not allowed; choose one of {', '.join(SNAPSHOT_MODES)} or 'auto'")
        if (mode == "disk") != (path is not None):
            raise ConfigError("snapshot='disk' needs snapshot_dir, and snapshot_dir is used only with snapshot='disk'")
        self.mode = mode
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Pinned host memory makes the device-to-host copy asynchronous; it needs CUDA.
        self.pin = mode != "device" and torch.cuda.is_available()
        self.committed_step: int | None = None
        self._committed: dict[str, Any] | None = None
        self._candidate: tuple[dict[str, Any], int] | None = None
        self._spare: dict[str, Any] = {}

    def capture(self, sources: Mapping[str, Any]) -> dict[str, Any]:
        """Copies of ``sources`` (a mapping of state dicts and tensors), no host sync in device mode."""
        spare, self._spare = self._spare, {}
        host = self.mode != "device"
        with torch.no_grad():
            return {k: _copy_into(spare.get(k), v, host and k in BULK, self.pin) for k, v in sources.items()}

    def commit(self, state: dict[str, Any], step: int) -> None:
        """Make ``state`` (taken at ``step``) the rollback target."""
        self.committed_step = step
        if self.path is None:
            if self._committed is not None:
                self._spare = self._committed
            self._committed = state
            return
        self._wait()
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a snapshot
        # The file is the snapshot: keeping its tensors as the spare would hold the host copy that the disk
        # mode exists to avoid, so the next capture allocates afresh (once per snapshot_every steps).
        self._spare = {}

    def propose(self, state: dict[str, Any], step: int) -> None:
        """Hold ``state`` as the candidate (a pending one is dropped)."""
        self.discard()
        self._candidate = (state, step)

    @property
    def candidate_step(self) -> int | None:
        """Step of the candidate waiting to be committed (``None`` when there is none)."""
        return None if self._candidate is None else self._candidate[1]

    def promote(self) -> None:
        """Commit the candidate, if any."""
        if self._candidate is not None:
            state, step = self._candidate
            self._candidate = None
            self.commit(state, step)

    def discard(self) -> None:
        """Drop the candidate, if any (its tensors become the spare)."""
        if self._candidate is not None:
            self._spare = self._candidate[0]
        self._candidate = None

    def load(self) -> dict[str, Any]:
        """A copy of the committed snapshot that the caller may hand to ``load_state_dict`` (which keeps
        the tensors it is given): the snapshot itself survives for the next rollback."""
        if self.path is None:
            if self._committed is None:
                raise StateError("no snapshot has been committed yet")
            self._wait()
            return copy.deepcopy(self._committed)
        try:
            # weights_only: a snapshot file is data; a pickle that would run code is refused, never executed.
            return torch.load(self.path, weights_only=True)
        except Exception as exc:  # refused pickle, truncated or foreign file: one line naming the file
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise StateError(
                f"cannot read the Guard snapshot {str(self.path)!r}: not a gradguard snapshot "
                f"({type(exc).__name__}: {first})"
            ) from None

    def where(self) -> str:
        """Where the committed snapshot lives, for messages."""
        return f"in {self.mode} memory" if self.path is None else repr(str(self.path))

    def _wait(self) -> None:
        # Pinned copies were queued with non_blocking=True: they must land before anyone reads them.
        if self.pin:
            torch.cuda.synchronize()
