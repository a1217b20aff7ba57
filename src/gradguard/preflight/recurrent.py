"""Step-by-step unrolling of recurrent modules with their own weights, to see ‖∂L/∂h_t‖ for every step.

``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` run their time loop inside one fused kernel, so the hidden states
``h_t`` never exist as separate autograd nodes and their gradients cannot be hooked. The probe therefore
recomputes the module's forward pass one step at a time from the same input, initial state and
parameters, checks that the result matches what the module returned, and differentiates the upstream
gradient (captured during the probe's real backward pass) through this explicit graph. The cost is one
extra forward and one or two backward passes (two when the loss reads outputs before the last step)
through a Python loop over time steps, which is slower than the fused kernel (see ``BENCHMARKS.md``, section Probe).

Gate layouts follow PyTorch: LSTM rows ``i, f, g, o``; GRU rows ``r, z, n`` with
``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`` and ``h' = (1 − z) ⊙ n + z ⊙ h``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradguard.nn.lstm import LSTM as GGLSTM
from gradguard.stats import (
    activation_derivative,
    scaled_spectral_radius,
    spectral_radius,
    tensor_norms,
    time_step_norms,
)

_ACT: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "relu": torch.relu}


@dataclass(frozen=True)
class CellSpec:
    """What the unroller needs to know about a recurrent module.

    Args:
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        nonlinearity: ``"tanh"`` or ``"relu"``; for LSTMs the cell activation φ.
        layers: stacked layers.
        hidden: units per layer.
        batch_first: layout of input and output.
        bias: whether bias vectors exist.
    """

    cell: str
    nonlinearity: str
    layers: int
    hidden: int
    batch_first: bool
    bias: bool


def cell_spec(module: nn.Module) -> CellSpec | None:
    """The :class:`CellSpec` of a module the unroller understands, else ``None``."""
    if isinstance(module, GGLSTM):
        return CellSpec("lstm", module.activation, module.num_layers, module.hidden_size, module.batch_first,
                        module.bias)
    if isinstance(module, nn.LSTM):
        return CellSpec("lstm", "tanh", module.num_layers, module.hidden_size, module.batch_first, module.bias)
    if isinstance(module, nn.GRU):
        return CellSpec("gru", "tanh", module.num_layers, module.hidden_size, module.batch_first, module.bias)
    if isinstance(module, nn.RNN):
        return CellSpec("rnn", module.nonlinearity, module.num_layers, module.hidden_size, module.batch_first,
                        module.bias)
    return None


def has_active_dropout(module: nn.Module) -> bool:
    """True for a stacked ``nn.RNN``/``LSTM``/``GRU`` whose inter-layer dropout is active (training mode)."""
    return isinstance(module, nn.RNNBase) and module.dropout > 0 and module.training and module.num_layers > 1


def unsupported_reason(module: nn.Module, x: object) -> str | None:
    """Why ``module`` called on ``x`` cannot be unrolled here, or ``None`` when it can."""
    if isinstance(module, nn.RNNBase):
        if module.bidirectional:
            return "bidirectional recurrences are not unrolled"
        if getattr(module, "proj_size", 0):
            return "LSTMs with proj_size are not unrolled"
    if not isinstance(x, Tensor):
        return "packed sequences are not unrolled"
    if x.dim() not in (2, 3):
        return f"input of shape {tuple(x.shape)} is neither (time, features) nor batched"
    return None


@dataclass
class Unrolled:
    """Result of :func:`unroll_profile` (all tensors on the module's device, nothing fetched)."""

    steps: int
    hidden_norms: Tensor  # (layers, steps): ‖∂L/∂h^k_t‖ under the real upstream gradient
    input_norms: Tensor  # (steps,): ‖∂L/∂x_t‖ at the module's input
    last_norms: Tensor  # (steps,): ‖∂(G_T·y_T)/∂h^0_t‖, only the last step's gradient sent back
    mean_derivative: Tensor  # (layers,): mean f' (RNN), else NaN
    gate_mean: Tensor  # (layers,): mean forget gate (LSTM) / update gate z (GRU), else NaN
    radius: Tensor  # (layers,): ρ(W_hh) for RNN, else NaN
    scaled_radius: Tensor  # (layers,): ρ(W_hh)·mean f' for RNN, else NaN
    unroll_error: Tensor  # relative max deviation of the unrolled output from the module's
    extra: dict[str, str] = field(default_factory=dict)


def _weights(module: nn.Module, k: int, bias: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    w_ih = getattr(module, f"weight_ih_l{k}")
    w_hh = getattr(module, f"weight_hh_l{k}")
    b_ih = getattr(module, f"bias_ih_l{k}") if bias else None
    b_hh = getattr(module, f"bias_hh_l{k}") if bias else None
    return w_ih, w_hh, b_ih, b_hh


def _initial_state(spec: CellSpec, hx: object, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(h0, c0)`` shaped ``(layers, batch, hidden)``, detached; zeros when the call passed none."""
    zeros = like.new_zeros(spec.layers, batch, spec.hidden)
    if hx is None:
        return zeros, (zeros if spec.cell == "lstm" else None)
    if isinstance(hx, tuple | list):
        h0, c0 = hx[0], hx[1]
    else:
        h0, c0 = hx, None
    h0 = h0.detach().reshape(spec.layers, batch, spec.hidden).to(like.dtype)
    if spec.cell == "lstm":
        c0 = zeros if c0 is None else c0.detach().reshape(spec.layers, batch, spec.hidden).to(like.dtype)
    return h0, c0


def unroll_profile(
    module: nn.Module,
    spec: CellSpec,
    x: Tensor,
    hx: object,
    outputs: list[Tensor],
    upstream: list[Tensor | None],
) -> Unrolled:
    """Unroll ``module`` on ``x`` and send the captured upstream gradients back through every step.

    Args:
        module: the recurrent module (its parameters are used as they are; nothing is written).
        spec: from :func:`cell_spec`.
        x: the input the module was called with, in the module's layout.
        hx: the initial state the module was called with (``None``, ``h0`` or ``(h0, c0)``).
        outputs: the module's returned tensors ``[output, h_n(, c_n)]``, for the consistency check.
        upstream: ``∂L/∂`` of each of ``outputs`` from the probe's backward pass (``None`` = unused).

    Returns:
        :class:`Unrolled` with ``‖∂L/∂h^k_t‖`` (true loss), ``‖∂L/∂x_t‖`` and the profile of the gradient
        coming from the last step alone, the product of per-step Jacobians (Bengio et al. 1994).
    """
    unbatched = x.dim() == 2
    xb = x.detach().unsqueeze(0 if spec.batch_first else 1) if unbatched else x.detach()
    if not spec.batch_first:
        xb = xb.transpose(0, 1)
    batch, steps = xb.shape[0], xb.shape[1]
    x_leaf = xb.clone().requires_grad_(True)
    h0, c0 = _initial_state(spec, hx, batch, xb)
    act = _ACT[spec.nonlinearity]

    hidden: list[list[Tensor]] = []
    derivs, gates = [], []
    layer_in: Tensor = x_leaf
    h_last, c_last = [], []
    for k in range(spec.layers):
        w_ih, w_hh, b_ih, b_hh = _weights(module, k, spec.bias)
        # One matmul for the input projection of every step; only the recurrence needs the loop.
        proj = layer_in @ w_ih.T
        if b_ih is not None:
            proj = proj + b_ih
        # unbind, not proj[:, t]: each slice's backward would materialise a zero tensor of the whole
        # sequence, which made the backward pass quadratic in the number of steps.
        proj_t = proj.unbind(1)
        h = h0[k]
        c = c0[k] if c0 is not None else None
        hs: list[Tensor] = []
        gate_sum = xb.new_zeros(())
        for t in range(steps):
            rec = h @ w_hh.T
            if b_hh is not None:
                rec = rec + b_hh
            if spec.cell == "rnn":
                h = act(proj_t[t] + rec)
            elif spec.cell == "lstm":
                i, f, g, o = (proj_t[t] + rec).chunk(4, dim=1)
                fg = torch.sigmoid(f)
                assert c is not None
                c = fg * c + torch.sigmoid(i) * act(g)
                h = torch.sigmoid(o) * act(c)
                gate_sum = gate_sum + fg.detach().mean()
            else:
                xr, xz, xn = proj_t[t].chunk(3, dim=1)
                hr, hz, hn = rec.chunk(3, dim=1)
                r = torch.sigmoid(xr + hr)
                z = torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = (1.0 - z) * n + z * h
                gate_sum = gate_sum + z.detach().mean()
            hs.append(h)
        hidden.append(hs)
        layer_in = torch.stack(hs, dim=1)
        h_last.append(h)
        if c is not None:
            c_last.append(c)
        if spec.cell == "rnn":
            derivs.append(activation_derivative(layer_in, spec.nonlinearity).float().mean())
            gates.append(xb.new_full((), float("nan")).float())
        else:
            derivs.append(xb.new_full((), float("nan")).float())
            gates.append((gate_sum / max(steps, 1)).float())
    out = layer_in
    h_n = torch.stack(h_last)
    unrolled: list[Tensor] = [out, h_n] + ([torch.stack(c_last)] if c_last else [])

    # Bring the module's own outputs and their gradients into the unroller's (batch, time, ...) layout.
    def to_layout(t: Tensor, is_seq: bool) -> Tensor:
        if is_seq:
            if unbatched:
                t = t.unsqueeze(0 if spec.batch_first else 1)
            return t if spec.batch_first else t.transpose(0, 1)
        return t.reshape(spec.layers, batch, spec.hidden)

    pairs = []
    err = xb.new_zeros(()).float()
    for j, (mine, theirs, grad) in enumerate(zip(unrolled, outputs, upstream, strict=False)):
        ref = to_layout(theirs.detach(), j == 0).to(mine.dtype)
        scale = ref.abs().max().clamp(min=1e-12)
        err = torch.maximum(err, ((mine.detach() - ref).abs().max() / scale).float())
        if grad is not None:
            pairs.append((j, mine, to_layout(grad, j == 0).to(mine.dtype)))

    flat_hidden = [h for hs in hidden for h in hs]
    nan_steps = xb.new_full((steps,), float("nan")).float()
    if not pairs:
        hidden_norms = xb.new_full((spec.layers, steps), float("nan")).float()
        input_norms, last_norms = nan_steps, nan_steps
    else:
        grads = torch.autograd.grad(
            [m for _, m, _ in pairs], [x_leaf, *flat_hidden], [g for _, _, g in pairs],
            retain_graph=True, allow_unused=True,
        )  # the graph is kept for the last-step pass below, when it is needed
        input_norms = _step_norms(grads[0], x_leaf)
        hidden_norms = torch.stack([_step_norms(g, h) for g, h in zip(grads[1:], flat_hidden, strict=True)])
        hidden_norms = hidden_norms.reshape(spec.layers, steps)
        # The gradient of the last step alone: the output at t = T−1 and the final states. Sending it back
        # through the explicit graph gives ‖(Π_t diag(f'_t) W)ᵀ g_T‖ at each earlier step.
        # A many-to-one model (loss on the last output or final state only) already sent back nothing but
        # that gradient: reuse the first pass instead of a second backward (one host check, once per probe).
        seq_grad = next((g for j, _, g in pairs if j == 0), None)
        if seq_grad is None or steps == 1 or not bool(seq_grad[:, :-1].any()):
            last_norms = hidden_norms[0]
        else:
            last_outs, last_grads = [], []
            for j, mine, g in pairs:
                last_outs.append(mine[:, -1] if j == 0 else mine)
                last_grads.append(g[:, -1] if j == 0 else g)
            lg = torch.autograd.grad(last_outs, hidden[0], last_grads, allow_unused=True)
            last_norms = torch.stack([_step_norms(g, h) for g, h in zip(lg, hidden[0], strict=True)]).reshape(steps)

    nan_layers = xb.new_full((spec.layers,), float("nan")).float()
    mean_derivative = torch.stack(derivs)
    if spec.cell == "rnn":
        radius = torch.stack([spectral_radius(getattr(module, f"weight_hh_l{k}")) for k in range(spec.layers)])
        scaled = torch.stack([
            scaled_spectral_radius(getattr(module, f"weight_hh_l{k}"), mean_derivative[k])
            for k in range(spec.layers)
        ])
    else:
        radius, scaled = nan_layers, nan_layers
    return Unrolled(
        steps=steps,
        hidden_norms=hidden_norms,
        input_norms=input_norms,
        last_norms=last_norms,
        mean_derivative=mean_derivative,
        gate_mean=torch.stack(gates),
        radius=radius.to(mean_derivative.device),
        scaled_radius=scaled.to(mean_derivative.device),
        unroll_error=err,
    )


def _step_norms(grad: Tensor | None, like: Tensor) -> Tensor:
    """L2 norm of a step's gradient over batch and units (per step for a sequence); 0 when none reaches it."""
    if grad is None:
        return like.new_zeros(like.shape[1] if like.dim() == 3 else ()).float()
    if grad.dim() == 3:  # (batch, time, features): one norm per step
        return time_step_norms(grad, time_dim=1)
    return tensor_norms([grad.double()])[0]  # float64 sum of squares: see time_step_norms
