"""Keras 3 on the PyTorch backend: readable torch view, hooks in ``model.fit``, monitor callback (seed S4.3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="the keras extra is not installed")
if keras.backend.backend() != "torch":  # pragma: no cover - depends on the environment
    pytest.skip("Keras was imported with another backend before this module", allow_module_level=True)

from gradguard.adapt import as_module, is_keras_model  # noqa: E402
from gradguard.errors import InputError, StateError  # noqa: E402
from gradguard.integrations.keras import GradGuardKerasCallback, KerasRecurrent, torch_view  # noqa: E402
from gradguard.stats import tensor_norms  # noqa: E402


def stacked_lstm(units: int = 100, steps: int = 10, features: int = 1) -> keras.Model:
    """Seed S4.3: two stacked LSTM layers of ``units`` and a linear output, SGD lr 0.01, clipvalue 1.0."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((steps, features)),
            keras.layers.LSTM(units, return_sequences=True, name="lstm1"),
            keras.layers.LSTM(units, name="lstm2"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, clipvalue=1.0), loss="mse")
    return model


def sine_data(n: int = 16, steps: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Tiny next-value regression on phase-shifted sines."""
    rng = np.random.default_rng(0)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    t = np.arange(steps + 1)[None, :] * 0.3 + phase
    wave = np.sin(t).astype("float32")
    return wave[:, :steps, None], wave[:, steps:]


def test_view_has_readable_names_and_shares_parameters() -> None:
    model = stacked_lstm(units=8)
    view = torch_view(model)
    assert [n for n, _ in view.named_modules()] == ["", "lstm1", "lstm2", "out"]
    assert [n for n, _ in view.named_parameters()] == [
        "lstm1.kernel",
        "lstm1.recurrent_kernel",
        "lstm1.bias",
        "lstm2.kernel",
        "lstm2.recurrent_kernel",
        "lstm2.bias",
        "out.kernel",
        "out.bias",
    ]
    # The very same Parameter objects Keras trains (nothing copied).
    assert all(p is v.value for p, v in zip(view.parameters(), model.trainable_variables, strict=True))
    assert isinstance(view.lstm1, KerasRecurrent) and view.lstm1.gradguard_recurrent and view.lstm1.batch_first
    assert not isinstance(view.out, KerasRecurrent)
    assert torch_view(model) is view  # cached: one tree, one routing
    assert is_keras_model(model) and not is_keras_model(view) and as_module(model) is view
    lin = torch.nn.Linear(2, 2)
    assert as_module(lin) is lin


def test_hooks_fire_for_view_calls_keras_calls_and_fit_without_symbolic_passes() -> None:
    model = stacked_lstm(units=8)
    view = torch_view(model)
    seen: list[tuple[str, tuple[int, ...], str]] = []
    for name, module in view.named_modules():
        module.register_forward_hook(
            lambda m, a, out, name=name: seen.append((name, tuple(out.shape), out.device.type))
        )
    x, y = sine_data(n=4)
    out_view = view(torch.as_tensor(x))
    expected = [("lstm1", (4, 10, 8), "cpu"), ("lstm2", (4, 8), "cpu"), ("out", (4, 1), "cpu"), ("", (4, 1), "cpu")]
    assert seen == expected  # each hook exactly once, innermost first
    seen.clear()
    out_keras = model(x)
    assert seen == expected
    torch.testing.assert_close(out_view, out_keras)
    seen.clear()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    # Two batches of two; Keras's shape-inference pass on "meta" tensors is not shown to the hooks.
    assert [s[0] for s in seen] == ["lstm1", "lstm2", "out", ""] * 2
    assert all(dev == "cpu" and shape[0] == 2 for _, shape, dev in seen)


def test_gradients_reachable_after_fit_batch_are_raw_keras_gradients() -> None:
    """Reference: the gradient of the same loss by plain torch autograd through the Keras model."""
    model = stacked_lstm(units=8)
    view = torch_view(model)
    x, y = sine_data(n=4)
    w0 = [p.detach().clone() for p in view.parameters()]
    # Reference gradient at w0, by torch autograd on the view.
    loss = torch.nn.functional.mse_loss(view(torch.as_tensor(x)), torch.as_tensor(y))
    ref = torch.autograd.grad(loss, list(view.parameters()))
    got: list[torch.Tensor] = []

    class Grab(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            got.extend(p.grad.detach().clone() for p in view.parameters())

    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[Grab()])
    torch.testing.assert_close(tensor_norms(got), tensor_norms(list(ref)), rtol=1e-5, atol=1e-7)
    # The weights did move (the step ran), so these are the gradients of the step, not of a later state.
    assert any(not torch.equal(a, p.detach()) for a, p in zip(w0, view.parameters(), strict=True))


def test_restore_stops_routing() -> None:
    model = stacked_lstm(units=4)
    view = torch_view(model)
    calls: list[str] = []
    view.out.register_forward_hook(lambda m, a, o: calls.append("out"))
    view.restore()
    model(sine_data(n=2)[0])
    assert calls == []
    assert torch_view(model) is not view  # a fresh view after restore


def test_errors() -> None:
    with pytest.raises(InputError, match="Linear"):
        torch_view(torch.nn.Linear(2, 2))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(StateError, match="not built"):
        torch_view(unbuilt)


# ------------------------------------------------------------------------------- the model.fit callback


def relu_lstm() -> keras.Model:
    """Seed S0.2 on Keras: ReLU LSTM cells, weights N(0, 1), biases 0.1, Adam — the recurrence explodes."""
    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomNormal(stddev=1.0, seed=0)
    kw = {
        "activation": "relu",
        "kernel_initializer": init,
        "recurrent_initializer": init,
        "bias_initializer": keras.initializers.Constant(0.1),
    }
    model = keras.Sequential(
        [
            keras.Input((10, 1)),
            keras.layers.LSTM(32, return_sequences=True, name="lstm1", **kw),
            keras.layers.LSTM(32, name="lstm2", **kw),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


class Record(keras.callbacks.Callback):
    """Reference: the running epoch loss Keras reports and the gradients present after each batch."""

    def __init__(self, view: torch.nn.Module) -> None:
        super().__init__()
        self.view = view
        self.running: list[tuple[int, float]] = []
        self.grad_norms: list[torch.Tensor] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.running.append((batch, float(logs["loss"])))
        self.grad_norms.append(tensor_norms([p.grad for p in self.view.parameters()]))


def test_callback_on_seed_s4_3_matches_keras_losses_and_gradients() -> None:
    from gradguard.integrations.keras import GradGuardKerasCallback

    model = stacked_lstm(units=100)
    view = torch_view(model)
    x, y = sine_data(n=24)
    cb = GradGuardKerasCallback(console=False, log_every=3, sample_every=3)
    ref = Record(view)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[cb, ref])
    history = cb.monitor.history
    assert [r["step"] for r in history] == list(range(6))
    # Per-batch loss from Keras's running mean m_b over equal batches: loss_b = (b+1)·m_b − b·m_{b−1}.
    expected = []
    for i, (b, mean) in enumerate(ref.running):
        prev = ref.running[i - 1][1] if b > 0 else 0.0
        expected.append((b + 1) * mean - b * prev)
    assert [r["loss"] for r in history] == pytest.approx(expected, rel=1e-4)
    names = [n for n, _ in view.named_parameters()]
    for row, norms in zip(history, ref.grad_norms, strict=True):
        got = [row[f"grad_norm/{n}"] for n in names]
        assert got == pytest.approx(norms.tolist(), rel=1e-5)
    assert "act/lstm1/mean" in history[0] and "act/out/std" in history[0]
    # The LSTM is recognised as recurrent: a per-time-step profile over the 10 input steps.
    assert tuple(cb.monitor.time_profiles["forward"]["lstm1"].shape) == (10,)
    # Healthy: small gradients, no exploding or non-finite finding.
    assert max(r["grad_norm"] for r in history) < 10.0
    assert not [f for f in cb.monitor.findings if f.kind in ("exploding", "nonfinite")]
    cb.monitor.close()


def test_callback_flags_exploding_relu_lstm() -> None:
    from gradguard.integrations.keras import GradGuardKerasCallback

    model = relu_lstm()
    x, y = sine_data(n=32)
    cb = GradGuardKerasCallback(console=False, log_every=2, sample_every=2)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    history = cb.monitor.history
    # Really sick: enormous gradients and losses (a healthy run above stays below 10 and 1).
    assert max(r["grad_norm"] for r in history) > 1e6
    assert max(r["loss"] for r in history) > 1e4
    exploding = [f for f in cb.monitor.findings if f.kind == "exploding"]
    assert any(f.module == "lstm1" for f in exploding), cb.monitor.findings
    cb.monitor.close()


def test_callback_rejects_monitor_and_options_together() -> None:
    import gradguard as gg
    from gradguard.integrations.keras import GradGuardKerasCallback

    model = stacked_lstm(units=4)
    mon = gg.watch(torch_view(model), console=False)
    with pytest.raises(InputError, match="either"):
        GradGuardKerasCallback(monitor=mon, log_every=3)
    cb = GradGuardKerasCallback(monitor=mon)
    x, y = sine_data(n=4)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert cb.monitor is mon and mon.steps == 2
    mon.close()


def test_callback_flushes_the_log_at_the_end_of_fit(tmp_path: Path) -> None:
    # 20 batches, log_every=10: the rules run at each of the first 16 steps, then steps 16-19 wait for the
    # schedule; on_train_end's flush writes them.
    from gradguard.integrations.keras import GradGuardKerasCallback

    model = stacked_lstm(units=4)
    cb = GradGuardKerasCallback(console=False, log_dir=tmp_path, log_every=10)
    x, y = sine_data(n=40)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "step"] == list(range(20))
    assert cb.monitor is not None and not cb.monitor.closed
    cb.monitor.close()


def test_probe_on_the_view_names_keras_layers_and_measures_their_gradients() -> None:
    import gradguard as gg

    model = stacked_lstm(units=16)
    view = torch_view(model)
    x, y = (torch.as_tensor(a) for a in sine_data(n=8))
    report = gg.probe(view, x, targets=y, loss_fn=torch.nn.functional.mse_loss)
    rows = {r.name: r for r in report.layers}
    assert list(rows) == ["lstm1", "lstm2", "out"]
    # Reference: plain autograd on the same loss, per layer's own parameters.
    loss = torch.nn.functional.mse_loss(view(x), y)
    for name in rows:
        params = list(getattr(view, name).parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        want = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        assert rows[name].param_grad_norm == pytest.approx(want, rel=1e-4), name
    assert report.loss == pytest.approx(float(loss.detach()), rel=1e-5)


def test_watch_and_probe_accept_the_keras_model_itself() -> None:
    import gradguard as gg

    model = stacked_lstm(units=8)
    x, y = sine_data(n=8)
    report = gg.probe(model, torch.as_tensor(x), targets=torch.as_tensor(y), loss_fn=torch.nn.functional.mse_loss)
    assert [r.name for r in report.layers] == ["lstm1", "lstm2", "out"]
    mon = gg.watch(model, console=False, log_every=1, sample_every=1)
    assert mon.model is torch_view(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[GradGuardKerasCallback(monitor=mon)])
    assert "grad_norm/lstm1.recurrent_kernel" in mon.history[-1] and "act/lstm2/std" in mon.history[-1]
    mon.close()
