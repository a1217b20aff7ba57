"""TensorBoard sink: the monitor's history rows as scalars, activation samples as histograms, findings as text.

Requires the ``tensorboard`` extra (``pip install gradguard[tensorboard]``); the writer is PyTorch's own
``torch.utils.tensorboard.SummaryWriter``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from gradguard.errors import ConfigError, InputError
from gradguard.findings import Finding
from gradguard.sinks.base import Sink

#: History-row prefixes written by default: global and per-parameter gradient norms, update ratios,
#: losses, and per-module activation summaries.
DEFAULT_PREFIXES: tuple[str, ...] = ("loss", "grad_norm", "update_ratio", "act/")


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def finding_markdown(finding: Finding) -> str:
    """A finding as the Markdown text TensorBoard's Text tab renders."""
    where = f"`{finding.module}`" if finding.module else "the whole model"
    lines = [
        f"**{finding.severity.upper()} — {finding.kind}** in {where} at step {finding.step}",
        "",
        finding.message,
        "",
        f"*Advice:* {finding.advice}",
    ]
    if finding.evidence:
        lines += ["", "| evidence | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in finding.evidence.items()]
    return "\n".join(lines)


class TensorBoardSink(Sink):
    """Write a monitor's records to a TensorBoard event file.

    * ``on_step(record)``: every numeric entry whose name starts with one of ``prefixes`` becomes a scalar
      with the record's own name as tag (``loss``, ``grad_norm``, ``grad_norm/<param>``,
      ``update_ratio/<param>``, ``act/<module>/<field>``) at ``record["step"]``.
    * ``on_histogram(step, tag, values)``: a histogram under ``tag`` (the monitor calls it on its activation
      schedule only, so histograms cost nothing on other steps).
    * ``on_finding(finding)``: Markdown text under ``findings/<kind>/<module>``.

    Under ``torch.distributed`` only global rank 0 writes (``rank_zero_only=True``): the monitor's gradient
    statistics are identical on every rank, so one file suffices; the event file is created lazily, on the
    first write, so other ranks never touch the disk.

    Args:
        log_dir: directory of the run (created if needed), or an existing ``SummaryWriter`` to share with
            other logging (it is then flushed but not closed by :meth:`close`).
        prefixes: which history entries become scalars; ``None`` writes every numeric entry.
        rank_zero_only: write only on rank 0 of the default process group.
        flush_secs: how often the writer flushes to disk.

    Example::

        mon = gg.watch(model, sinks=[TensorBoardSink("runs/exp1")])
    """

    def __init__(
        self,
        log_dir: str | Path | Any,
        *,
        prefixes: Sequence[str] | None = DEFAULT_PREFIXES,
        rank_zero_only: bool = True,
        flush_secs: int = 30,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "TensorBoardSink needs the tensorboard package: pip install 'gradguard[tensorboard]'"
            ) from exc
        if isinstance(log_dir, SummaryWriter):
            self._writer: Any = log_dir
            self._owns_writer = False
            self.log_dir = Path(log_dir.log_dir)
        elif isinstance(log_dir, (str, Path)):
            self._writer = None
            self._owns_writer = True
            self.log_dir = Path(log_dir)
        else:
            raise InputError(f"log_dir must be a path or a SummaryWriter, got {type(log_dir).__name__}")
        if prefixes is not None and (isinstance(prefixes, str) or not all(isinstance(p, str) for p in prefixes)):
            raise InputError(f"prefixes must be a sequence of strings or None, got {prefixes!r}")
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, int) or flush_secs < 1:
            raise ConfigError(f"flush_secs must be an integer >= 1, got {flush_secs!r}")
        self.prefixes = None if prefixes is None else tuple(prefixes)
        self.flush_secs = flush_secs
        self._active = not rank_zero_only or _is_rank_zero()
        self._closed = False

    @property
    def writer(self) -> Any:
        """The underlying ``SummaryWriter`` (created on first use), or ``None`` on ranks that do not write."""
        if not self._active:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def _wanted(self, name: str) -> bool:
        return self.prefixes is None or any(name.startswith(p) for p in self.prefixes)

    def on_step(self, record: Mapping[str, float]) -> None:
        """Write the record's numeric entries as scalars at ``record["step"]``."""
        if not self._active or self._closed:
            return
        step = int(record.get("step", 0))
        writer = self.writer
        for name, value in record.items():
            if name == "step" or not self._wanted(name):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            # NaN and Inf are written as they are: TensorBoard shows them, and hiding them would hide the
            # very event (a non-finite loss) the user is looking for.
            writer.add_scalar(name, float(value), step)

    def on_histogram(self, step: int, tag: str, values: Tensor) -> None:
        """Write a histogram of ``values`` (non-finite entries dropped: TensorBoard cannot bin them)."""
        if not self._active or self._closed:
            return
        flat = values.detach().reshape(-1).float().cpu()
        finite = flat[flat.isfinite()]
        if finite.numel() == 0:
            return
        self.writer.add_histogram(tag, finite, int(step))

    def on_finding(self, finding: Finding) -> None:
        """Write the finding as Markdown text under ``findings/<kind>/<module>``."""
        if not self._active or self._closed:
            return
        module = finding.module or "model"
        self.writer.add_text(f"findings/{finding.kind}/{module}", finding_markdown(finding), int(finding.step))

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self._active and self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and (if this sink created it) close the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.flush()
            if self._owns_writer:
                self._writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a TensorBoard run as ``{tag: [(step, value), ...]}``, read with tensorboard's reader.

    Convenience for tests and reports; NaN and Inf survive the round trip.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
