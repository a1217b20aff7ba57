"""Where a NaN/Inf was born: replay the recorded step under localisation hooks.

Nothing here runs in the steady state. The monitor keeps references to the last training forward's
inputs, the RNG state before it, and the gradient that reached the model's outputs in the backward pass.
Once a non-finite value is flagged, :func:`localize` re-runs that forward and backward with hooks on every
module and names the *producer*:

- forward: the first module (in completion order, so the innermost) whose inputs and parameters were
  finite but whose output was not; a module whose input already held the NaN only passes it on and is
  never blamed;
- backward: the first module whose output gradient was finite but whose input gradient or own parameter
  gradient was not (e.g. ``sqrt`` at 0: finite forward, infinite derivative);
- the loss: model outputs finite but the loss (or the gradient the loss sent back) not → module ``""``.

The backward is replayed with ``torch.autograd.grad`` seeded with the recorded output gradients, so the
loss function need not be known and ``.grad`` is untouched. Buffers (e.g. BatchNorm running stats) and
the RNG state are restored afterwards, so the replay leaves no trace on the model.

Each forward is replayed as it ran: from the RNG state before it and under the autocast state (device
types and dtypes) it ran in, so an fp16 overflow is found in the layer that overflowed, not in an fp32
re-run where nothing overflows.

Gradient accumulation: every training forward of the step (up to ``max_calls``) is a :class:`Call` with
its own inputs and the gradient its outputs received, so each micro-batch is replayed on its own and
the first one that produced a NaN/Inf is named (``evidence["micro_batch"]``, counted from 0). The loss
passed to ``mon.step`` is then only the last resort: blamed when every kept forward and backward was
finite but that loss was not. Memory kept per forward until ``mon.step``: references to its inputs and
outputs, and one gradient the size of its outputs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.detect.base import Origin
from gradguard.monitor.hooks import graph_task, in_backward

#: Device types whose autocast state a replay restores.
_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass
class Call:
    """One recorded training forward of the root module."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_cpu: Tensor | None
    rng_cuda: list[Tensor] | None = None
    output_grads: list[Tensor | None] = field(default_factory=list)
    #: The outputs the forward returned (detached references): a replay whose outputs are finite where
    #: these were not did not reproduce the step.
    outputs: list[Tensor] = field(default_factory=list)
    #: ``(device type, dtype)`` of every autocast region active around the forward.
    autocast: tuple[tuple[str, torch.dtype], ...] = ()


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast regions active now, as ``((device type, dtype), ...)`` (no device work)."""
    return tuple(
        (d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)
    )


@contextlib.contextmanager
def replaying_as(call: Call) -> Iterator[None]:
    """Run the body as ``call`` ran: its RNG state (restored after) and autocast regions, grad enabled."""
    devices = [torch.cuda.current_device()] if call.rng_cuda is not None else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.enable_grad())
        if call.rng_cpu is not None:
            torch.set_rng_state(call.rng_cpu)
        if call.rng_cuda is not None:
            torch.cuda.set_rng_state_all(call.rng_cuda)
        for device, dtype in call.autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested tuples/lists/dicts (module inputs and outputs)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from tensors_in(o)


def _nonfinite(ts: Sequence[Tensor]) -> int:
    return int(sum(int((~torch.isfinite(t.detach())).sum()) for t in ts if t.is_floating_point()))


class _Recorder:
    """Hooks for one replay; every result is a host int, synchronising freely (this is the slow path)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.seq = itertools.count()
        self.forward_bad: list[tuple[int, str, dict[str, Any]]] = []
        self.grad_out_bad: dict[tuple[str, int], int] = {}
        self.grad_out_seen: set[tuple[str, int]] = set()
        self.backward_bad: list[tuple[int, str, int, dict[str, Any]]] = []
        self.param_grad_bad: dict[str, tuple[int, int]] = {}
        self.calls: dict[str, int] = {}
        self.outer = -1  # the graph task the replay started in (see in_backward)
        self.handles: list[Any] = []
        self._inputs_finite: dict[str, list[bool]] = {}

    def attach(self) -> None:
        self.outer = graph_task()
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post(name), with_kwargs=True))
            for pname, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    self.handles.append(p.register_hook(self._param_hook(name, pname)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, name: str):
        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if in_backward(self.outer):
                return  # a checkpoint recomputation repeats a forward already checked
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            ins = list(tensors_in((args, kwargs)))
            # Input finiteness is read here, before the module runs, because in-place modules
            # (nn.ReLU(inplace=True)) overwrite their input.
            self._inputs_finite.setdefault(name, []).append(_nonfinite(ins) == 0)
            for t in ins:
                if t.requires_grad:
                    t.register_hook(self._grad_in_hook(name, call))

        return pre

    def _post(self, name: str):
        def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if in_backward(self.outer):
                return
            call = self.calls[name] - 1
            inputs_ok = self._inputs_finite[name].pop()
            outs = list(tensors_in(output))
            bad_out = _nonfinite(outs)
            own = [p for _, p in mod.named_parameters(recurse=False)]
            bad_params = _nonfinite(own)
            if inputs_ok and bad_out:
                total = sum(t.numel() for t in outs)
                self.forward_bad.append(
                    (next(self.seq), name, {"call": call, "nonfinite": bad_out, "numel": total,
                                            "nonfinite_params": bad_params})
                )
            for t in outs:
                if t.requires_grad:
                    t.register_hook(self._grad_out_hook(name, call))

        return post

    def _grad_out_hook(self, name: str, call: int):
        def hook(g: Tensor) -> None:
            key = (name, call)
            self.grad_out_seen.add(key)
            self.grad_out_bad[key] = self.grad_out_bad.get(key, 0) + _nonfinite([g])

        return hook

    def _grad_in_hook(self, name: str, call: int):
        def hook(g: Tensor) -> None:
            bad = _nonfinite([g])
            if bad:
                self.backward_bad.append((next(self.seq), name, call, {"nonfinite": bad, "numel": g.numel()}))

        return hook

    def _param_hook(self, name: str, pname: str):
        def hook(g: Tensor) -> None:
            bad = _nonfinite([g])
            if bad and name not in self.param_grad_bad:
                self.param_grad_bad[name] = (next(self.seq), bad)

        return hook


def _innermost(candidates: list[tuple[int, str]]) -> tuple[int, str]:
    """Earliest candidate, but a descendant beats its ancestor (a container shares its child's tensors)."""
    names = {n for _, n in candidates}
    leaves = [(s, n) for s, n in candidates if not any(o != n and (n == "" or o.startswith(n + ".")) for o in names)]
    return min(leaves or candidates)


def _first_receiver(model: nn.Module, modules: Mapping[str, nn.Module], call: Call) -> str:
    """The innermost module that first received a non-finite input in a replay of ``call`` ("" if none)."""
    seq = itertools.count()
    hits: list[tuple[int, str]] = []

    def pre(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if _nonfinite(list(tensors_in((args, kwargs)))):
                hits.append((next(seq), name))
        return hook

    handles = [m.register_forward_pre_hook(pre(n), with_kwargs=True) for n, m in modules.items() if n]
    try:
        with torch.no_grad():
            model(*call.args, **call.kwargs)
    except Exception:  # the replay only names a module; a model that rejects NaN keeps the hits so far
        pass
    finally:
        for h in handles:
            h.remove()
    return _innermost(hits)[1] if hits else ""


def snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(buffer, copy)`` pairs; :func:`restore_buffers` undoes what a replayed forward did to them."""
    return [(b, b.detach().clone()) for b in model.buffers()]


def restore_buffers(saved: Sequence[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)


def localize(
    model: nn.Module, calls: Sequence[Call], loss_value: float | None, *, forwards: int | None = None
) -> Origin | None:
    """Replay ``calls`` (the step's training forwards) and return the producer of the first NaN/Inf.

    ``loss_value`` is the loss passed to ``mon.step`` (``None`` if unknown); ``forwards`` the number of
    training forwards the step made (``len(calls)`` unless some were not kept). Returns ``None`` when the
    replay is entirely finite (e.g. the inputs were overwritten in place since the step).
    """
    modules = {name: m for name, m in model.named_modules()}
    buffers = snapshot_buffers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n = max(forwards or 0, len(calls))
    try:
        for k, call in enumerate(calls):
            with replaying_as(call):
                origin = _replay_one(model, modules, params, call, loss_value, k, n)
            if origin is not None:
                return origin
    finally:
        restore_buffers(buffers)
    if calls and loss_value is not None and not _is_finite(loss_value) and len(calls) == n:
        return Origin("", "forward", f"the model's outputs and gradients were finite in every forward of the step "
                      f"but the loss passed to mon.step() was {loss_value}", {"loss": loss_value, "forwards": n})
    return None


def localize_step(module: nn.Module, calls: Sequence[Call], loss_value: float | None, *, forwards: int,
                  compiled: bool) -> Origin | None:
    """:func:`localize`, worded for the monitor's finding, and never raising: a replay that fails must never
    break the user's training step. ``compiled``: the step's forward ran compiled, so an eager replay may
    not reproduce it (and a reproduction says so)."""
    try:
        origin = localize(module, calls, loss_value, forwards=forwards)
    except Exception as exc:  # the model's own code runs here: any error is possible
        return Origin(
            "", "forward", f"the replay that localises it failed ({type(exc).__name__}: {exc})",
            {"replay_error": repr(exc)},
        )
    if origin is not None and origin.evidence.get("reproduced") is False and compiled:
        origin = None  # worded below, with the reason a compiled step may not replay faithfully
    if origin is not None:
        if compiled and "replay_error" not in origin.evidence:
            origin = Origin(origin.module, origin.phase, origin.what + "; the step ran compiled and an eager "
                            "replay reproduced it", {**origin.evidence, "eager_replay": "reproduced"})
        return origin
    if forwards > len(calls) and calls:
        return Origin("", "forward", f"the step made {forwards} training forwards and the monitor keeps the "
                      f"first {len(calls)} (gg.watch(max_calls=...)), which replayed finite: it was born "
                      "in a later one", {"replay_error": "forward not kept", "forwards": forwards})
    if compiled:
        random = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())
        why = ("the compiled code draws its own random numbers (dropout), so the eager replay cannot be faithful"
               if random else "compiled code may draw its own random numbers or round differently, or the inputs "
               "changed in place since the step")
        if not calls:
            return Origin("", "forward", "the step ran compiled without passing the monitor's hooks, so it could "
                          "not be replayed (watch the compiled wrapper: gg.watch(torch.compile(model)))",
                          {"replay_error": "forward not seen"})
        return Origin("", "forward", f"the step ran compiled and an eager replay could not reproduce it ({why})",
                      {"replay_error": "could not reproduce in eager", "eager_replay": "not reproduced"})
    return None


def _where(k: int, n: int) -> str:
    return f" (micro-batch {k} of {n}, counted from 0)" if n > 1 else ""


def _replay_one(
    model: nn.Module, modules: Mapping[str, nn.Module], params: Sequence[Tensor], call: Call,
    loss_value: float | None, index: int, forwards: int,
) -> Origin | None:
    where = _where(index, forwards)
    mb = {"micro_batch": index, "forwards": forwards} if forwards > 1 else {}
    bad_inputs = _nonfinite(list(tensors_in((call.args, call.kwargs))))
    if bad_inputs:
        ev: dict[str, Any] = {"nonfinite_inputs": bad_inputs, **mb}
        first = next(tensors_in((call.args, call.kwargs)), None)
        if first is not None and not _nonfinite([first]):
            # The batch is clean and another input (a carried hidden state) is not: name its consumer.
            ev["received_by"] = _first_receiver(model, modules, call)
            return Origin("", "forward", f"an input beside the batch (a carried state) held {bad_inputs} "
                          f"non-finite values{where}", ev)
        return Origin("", "forward", f"the input batch itself held {bad_inputs} non-finite values{where}", ev)
    rec = _Recorder(modules)
    rec.attach()
    try:
        output = model(*call.args, **call.kwargs)
        if rec.forward_bad:
            seq, name = _innermost([(s, n) for s, n, _ in rec.forward_bad])
            ev = next(e for s, n, e in rec.forward_bad if s == seq and n == name)
            what = (
                f"its inputs were finite but its output held {ev['nonfinite']} non-finite of {ev['numel']} values"
            )
            if ev["nonfinite_params"]:
                what += f" (its own parameters already held {ev['nonfinite_params']} non-finite values)"
            if call.autocast:
                what += " under autocast " + ", ".join(f"{d} {str(t).removeprefix('torch.')}" for d, t in call.autocast)
            return Origin(name, "forward", what + where, {**ev, **mb})
        outs = [t for t in tensors_in(output)]
        recorded_bad = _nonfinite(call.outputs)
        if recorded_bad and not _nonfinite(outs):
            return Origin("", "forward", f"the step's outputs held {recorded_bad} non-finite values but the replayed "
                          f"forward's were finite{where}", {"replay_error": "outputs not reproduced",
                                                            "reproduced": False, **mb})
        grads = call.output_grads
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False) if g is not None and o.requires_grad]
        loss_bad = loss_value is not None and not _is_finite(loss_value)
        if forwards == 1 and loss_bad:
            return Origin("", "forward", f"the model's outputs were finite but the loss was {loss_value}",
                          {"loss": loss_value})
        if not pairs:
            return None
        bad_seed = _nonfinite([g for _, g in pairs])
        if bad_seed and loss_bad:
            # This forward's outputs were finite and the loss sent non-finite gradients back to them:
            # the loss of this micro-batch was not finite.
            return Origin("", "forward", f"the model's outputs were finite but the loss was {loss_value}{where}",
                          {"loss": loss_value, "nonfinite": bad_seed, **mb})
        if bad_seed:
            return Origin(
                "", "backward",
                f"the model's outputs were finite but the gradient the loss sent back held {bad_seed} "
                f"non-finite values{where}",
                {"nonfinite": bad_seed, **mb},
            )
        torch.autograd.grad(
            [o for o, _ in pairs], params, grad_outputs=[g for _, g in pairs], allow_unused=True
        )
        candidates: list[tuple[int, str, dict[str, Any]]] = []
        for seq, name, call_idx, ev in rec.backward_bad:
            key = (name, call_idx)
            if key in rec.grad_out_seen and rec.grad_out_bad.get(key, 0) == 0:
                candidates.append((seq, name, {**ev, "where": "input gradient"}))
        for name, (seq, bad) in rec.param_grad_bad.items():
            # A child whose forward never runs (nn.MultiheadAttention reads out_proj.weight directly)
            # has no output gradient of its own: its nearest ancestor that did run answers for it.
            owner = name
            while owner and not any(k[0] == owner for k in rec.grad_out_seen):
                owner = owner.rpartition(".")[0]
            seen = [k for k in rec.grad_out_seen if k[0] == owner]
            if seen and all(rec.grad_out_bad.get(k, 0) == 0 for k in seen):
                candidates.append((seq, owner, {"nonfinite": bad, "where": "parameter gradient"}))
        if not candidates:
            return None
        seq, name = _innermost([(s, n) for s, n, _ in candidates])
        ev = next(e for s, n, e in candidates if s == seq and n == name)
        what = (
            f"its output gradient was finite but its {ev['where']} held {ev['nonfinite']} non-finite values"
        )
        return Origin(name, "backward", what + where, {**ev, **mb})
    finally:
        rec.detach()


def _is_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
