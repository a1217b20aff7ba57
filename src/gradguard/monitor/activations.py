"""Forward hooks that summarise module outputs on sampled steps only.

The hooks are attached right before a sampled step's forward pass and removed after its ``mon.step()``,
so a non-sampled step runs the model with no gradguard hook at all except the root's replay hooks.
Inside a hook nothing is synchronised: summaries are device tensors collected for the next fetch.

Evaluation passes are skipped: a call made under ``torch.no_grad()`` or while the root module is in
``eval()`` mode is not a training step and would bias the statistics (e.g. dropout off, no BN noise).
A module called several times in one forward contributes one summary per call; they are pooled on fetch.

Activation checkpointing (``torch.utils.checkpoint``) runs a segment's forward again inside the backward
pass. A module seen in the step's forward is not counted again there (non-reentrant checkpointing); one
whose forward ran under ``no_grad`` (reentrant checkpointing) is counted once, at its recomputation.

Under ``torch.compile`` the hooks compile to nothing (:class:`gradguard.monitor.hooks.WeakHook`); the
monitor then summarises a sampled step through one extra eager forward of the original module, in which
the tap accepts calls made under ``no_grad`` (:attr:`ActivationTap.eager`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard.monitor.hooks import WeakHook, in_backward
from gradguard.stats import saturation_kind
from gradguard.stats.activations import SUMMARY_FIELDS, activation_summaries, is_recurrent, unit_dim, unit_peak

#: Entries of a module output summarised per call. Larger outputs are summarised on a fixed uniform
#: random sample of positions (mean, std and fractions are then estimates with a standard error
#: ≈ 1/√1024 ≈ 3% of the spread); dead-unit counts and time profiles always use the whole output. The cap
#: keeps a sampled step cheap: summaries cost several per-element passes over every output otherwise.
SUMMARY_SAMPLE = 1024

#: Modules whose outputs can "die" (exactly zero for every input); unit activity is tracked for them.
_RELU_LIKE = (nn.ReLU, nn.ReLU6)
@dataclass
class Sample:
    """Device tensors gathered during one sampled step, per module name."""

    step: int
    raw: list[tuple[str, Tensor]] = field(default_factory=list)
    #: One summary row per module call (fields ``SUMMARY_FIELDS``), filled by :meth:`ActivationTap.disarm`.
    matrix: Tensor | None = None
    #: Per module, its rows in ``matrix`` (one per call).
    rows: dict[str, list[int]] = field(default_factory=dict)
    activity: dict[str, Tensor] = field(default_factory=dict)  # per-unit peak output (ReLU-like modules)
    time_forward: dict[str, Tensor] = field(default_factory=dict)
    time_grad: dict[str, Tensor] = field(default_factory=dict)
    order: dict[str, None] = field(default_factory=dict)  # module names in forward-completion order
    #: Modules summarised outside a backward pass (checkpoint recomputations of these are not counted).
    forward_seen: set[str] = field(default_factory=set)
    #: The leaf module that completed last was a convolution (its channels come first in what follows).
    after_conv: bool = False


class ActivationTap:
    """Attach/detach forward hooks on every named submodule for sampled steps.

    Args:
        root: the watched model (its ``training`` flag decides whether a call is a training pass).
        modules: ``{qualified name: module}`` to summarise.
    """

    def __init__(self, root: nn.Module, modules: Mapping[str, nn.Module]) -> None:
        self.root = root
        self.modules = dict(modules)
        self.kinds = {name: saturation_kind(m) for name, m in self.modules.items()}
        self.handles: list[RemovableHandle] = []
        self.current: Sample | None = None
        #: True during the monitor's own eager forward of a compiled model (run under ``no_grad``).
        self.eager = False
        #: While frozen, the hooks stay as they are (attached or not): a graph compiled with them guards on
        #: how many hooks each module has, and toggling them per sampled step would recompile it.
        self.frozen = False
        self._positions: dict[tuple[int, torch.device], Tensor] = {}
        self._flags = {
            name: (is_recurrent(m), isinstance(m, _RELU_LIKE), bool(getattr(m, "batch_first", False)),
                   next(m.children(), None) is None)
            for name, m in self.modules.items()
        }
        # Built once: arming a sampled step only registers them.
        self._hooks = [(m, WeakHook(self, "_on_output", name)) for name, m in self.modules.items()]

    @property
    def armed(self) -> bool:
        return self.current is not None

    def arm(self, step: int, *, attach: bool = True) -> None:
        """Start gathering for ``step``; ``attach=False`` leaves the hooks off until :meth:`attach`."""
        if self.armed:
            self.disarm()
        self.current = Sample(step=step)
        if attach and not self.frozen:
            self.attach()

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if not self.handles:
            self.handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

    def detach(self) -> None:
        """Remove the forward hooks, keeping what was gathered."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def disarm(self) -> Sample | None:
        """Remove the hooks (unless frozen) and hand over what they gathered (``None`` if nothing was)."""
        if not self.frozen:
            self.detach()
        sample, self.current = self.current, None
        if sample is None or not sample.raw:
            return None
        # Every call's summary in one batched computation (see gradguard.stats.activations).
        tensors = [t for _, t in sample.raw]
        if all(t.shape == tensors[0].shape for t in tensors):
            # The usual case (every output sampled to SUMMARY_SAMPLE entries): hand over one matrix.
            matrix = activation_summaries(torch.stack(tensors), [self.kinds[n] for n, _ in sample.raw])
        else:
            matrix = activation_summaries(tensors, [self.kinds[n] for n, _ in sample.raw])
        sample.matrix = matrix
        for i, (name, _) in enumerate(sample.raw):
            sample.rows.setdefault(name, []).append(i)
        sample.raw.clear()
        return sample

    def _sample(self, out: Tensor) -> Tensor:
        # ``out`` is detached by the caller.
        n = out.numel()
        if n <= SUMMARY_SAMPLE:
            # A copy: a later in-place op (ReLU(inplace=True)) must not change it.
            return out.reshape(-1).clone()
        key = (n, out.device)
        idx = self._positions.get(key)
        if idx is None:
            g = torch.Generator().manual_seed(n)
            idx = torch.randint(n, (SUMMARY_SAMPLE,), generator=g).to(out.device)
            self._positions[key] = idx
        # take() indexes the flattened tensor whatever its strides: one gather, no reshape copy.
        return torch.take(out, idx)

    def _on_output(self, name: str, mod: nn.Module, args: tuple[object, ...], output: object) -> None:
        sample = self.current
        if sample is None or not (self.eager or torch.is_grad_enabled()) or not self.root.training:
            return
        if in_backward():
            # A checkpoint recomputation: count it only if the forward itself was not seen (reentrant).
            if name in sample.forward_seen:
                return
        else:
            sample.forward_seen.add(name)
        out = output[0] if isinstance(output, tuple | list) and output else output
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() == 0:
            return
        recurrent, relu_like, batch_first, leaf = self._flags[name]
        det = out.detach()  # once: nothing below may enter the autograd graph
        sample.raw.append((name, self._sample(det)))
        sample.order[name] = None
        after_conv = sample.after_conv
        if leaf:
            sample.after_conv = isinstance(mod, nn.modules.conv._ConvNd)
        if relu_like:
            peak = unit_peak(det, unit_dim(det, mod, after_conv=after_conv))
            prev = sample.activity.get(name)
            sample.activity[name] = peak if prev is None or prev.shape != peak.shape else torch.maximum(prev, peak)
        if recurrent and out.dim() == 3:
            self._time_profiles(sample, name, out, batch_first)

    @staticmethod
    def _time_profiles(sample: Sample, name: str, out: Tensor, batch_first: bool) -> None:
        # RMS over batch and features at each time step t: ‖h_t‖ / √(B·H). A ReLU recurrence whose
        # Jacobian has spectral radius > 1 makes this grow geometrically with t (Pascanu et al., 2013).
        reduce = (0, 2) if batch_first else (1, 2)
        sample.time_forward[name] = out.detach().float().pow(2).mean(dim=reduce).sqrt()
        if out.requires_grad:

            def grad_hook(g: Tensor) -> None:
                # Per-time-step gradient norm of the output sequence, ‖∂L/∂h_t‖ over batch and features.
                prof = g.detach().float().pow(2).sum(dim=reduce).sqrt()
                prev = sample.time_grad.get(name)
                sample.time_grad[name] = prof if prev is None or prev.shape != prof.shape else prev + prof

            out.register_hook(grad_hook)


def pool_summaries(stacked: Tensor) -> dict[str, float]:
    """Combine the per-call summary rows (host tensor ``(calls, 6)``) of one module into one (host floats).

    Means and fractions are weighted by element counts; the std is pooled through E[x²] = std² + mean².
    """
    if stacked.shape[0] == 1:
        return dict(zip(SUMMARY_FIELDS, stacked[0].tolist(), strict=True))
    stacked = stacked.double()
    f = {name: stacked[:, i] for i, name in enumerate(SUMMARY_FIELDS)}
    numel = f["numel"]
    finite = (numel - f["nonfinite"]).clamp(min=0)
    n_fin = float(finite.sum())
    total = float(numel.sum())
    w = finite / max(n_fin, 1.0)
    mean = float((w * f["mean"]).sum())
    second = float((w * (f["std"] ** 2 + f["mean"] ** 2)).sum())
    return {
        "mean": mean,
        "std": max(second - mean * mean, 0.0) ** 0.5,
        "frac_zero": float((f["frac_zero"] * numel).sum()) / max(total, 1.0),
        "frac_saturated": float((f["frac_saturated"] * finite).sum()) / max(n_fin, 1.0),
        "nonfinite": float(f["nonfinite"].sum()),
        "numel": total,
    }
