"""A multi-layer LSTM whose cell activation is selectable (PyTorch's ``nn.LSTM`` is tanh-only)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradguard.errors import InputError, check_choice, check_number

#: Cell activations: the one applied to the candidate g_t and to the cell state on output.
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class LSTM(nn.Module):
    """LSTM (Hochreiter & Schmidhuber 1997) with a choice of cell activation φ ∈ {tanh, relu}.

    Per layer and time step, with gates in PyTorch's order i, f, g, o::

        i, f, o = σ(W_i x + b_i + U_i h + c_i), ...     (input, forget, output gates)
        g = φ(W_g x + b_g + U_g h + c_g)                (candidate)
        c' = f ⊙ c + i ⊙ g,   h' = o ⊙ φ(c')

    Parameters are named and laid out exactly as in ``torch.nn.LSTM`` (``weight_ih_l{k}`` of shape
    ``(4·hidden, in)``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``), so initialisation schemes
    and the monitor treat both alike; with ``activation="tanh"`` the outputs equal ``nn.LSTM``'s given the
    same weights. With ``activation="relu"`` nothing bounds h or c, so a ReLU LSTM can explode (the lab's
    ``relu_lstm`` experiment, docs/remedies.md).

    Args:
        input_size: features per time step.
        hidden_size: units per layer.
        num_layers: stacked layers.
        activation: ``"tanh"`` (default) or ``"relu"``.
        batch_first: inputs and outputs are ``(batch, time, features)`` when True.
        bias: add the biases ``b`` and ``c``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        activation: str = "tanh",
        batch_first: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_number("input_size", input_size, low=1, integer=True)
        check_number("hidden_size", hidden_size, low=1, integer=True)
        check_number("num_layers", num_layers, low=1, integer=True)
        check_choice("activation", activation, ACTIVATIONS)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.activation = activation
        self.batch_first = batch_first
        self.bias = bias
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            if bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default: every parameter ~ U(−1/√hidden, 1/√hidden)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"activation={self.activation!r}, batch_first={self.batch_first}"
        )

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the sequence; returns ``(output, (h_n, c_n))`` shaped as ``nn.LSTM`` returns them."""
        if x.dim() != 3:
            raise InputError(f"LSTM expects a 3-d input (batch, time, features), got shape {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[0]
        phi = ACTIVATIONS[self.activation]
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        h_all, c_all = state
        h_n, c_n = [], []
        layer_in = x
        for k in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{k}")
            w_hh = getattr(self, f"weight_hh_l{k}")
            # The input projection of every step in one matmul; only the recurrence needs the loop.
            proj = layer_in @ w_ih.T
            if self.bias:
                proj = proj + getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
            h, c = h_all[k], c_all[k]
            outs = []
            # unbind, not proj[:, t]: the backward of one indexing per step would materialise a full-size
            # zero gradient each time (quadratic in the length); unbind's backward is a single stack.
            for p_t in proj.unbind(1):
                gates = p_t + h @ w_hh.T
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * phi(g)
                h = torch.sigmoid(o) * phi(c)
                outs.append(h)
            layer_in = torch.stack(outs, dim=1)
            h_n.append(h)
            c_n.append(c)
        out = layer_in if self.batch_first else layer_in.transpose(0, 1)
        return out, (torch.stack(h_n), torch.stack(c_n))
