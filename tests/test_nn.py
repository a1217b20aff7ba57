"""gradguard.nn.LSTM against torch.nn.LSTM."""

import pytest
import torch

import gradguard as gg


def test_tanh_lstm_equals_torch_lstm() -> None:
    ours = gg.nn.LSTM(3, 8, num_layers=2)
    ref = torch.nn.LSTM(3, 8, num_layers=2, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 3)
    out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    out_ref.sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_relu_lstm_is_unbounded() -> None:
    lstm = gg.nn.LSTM(1, 16, activation="relu")
    for p in lstm.parameters():
        torch.nn.init.normal_(p, 0.0, 1.0)
    out, _ = lstm(torch.rand(2, 50, 1))
    assert out.abs().max().item() > 1.0  # tanh would bound |h| by 1


def test_bad_activation_names_allowed_values() -> None:
    with pytest.raises(gg.ConfigError, match="'relu'"):
        gg.nn.LSTM(1, 4, activation="gelu")


def test_non_sequence_input_is_an_input_error() -> None:
    with pytest.raises(gg.InputError, match=r"3-d input .* shape \(4, 3\)"):
        gg.nn.LSTM(3, 4)(torch.randn(4, 3))


def test_options_after_num_layers_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        gg.nn.LSTM(1, 4, 1, "relu")  # type: ignore[misc]


def test_norm_layers_are_skipped_by_init_and_penalty_alike() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.RMSNorm(3))
    assert all(isinstance(m, gg.nn.NORM_LAYERS) for m in model[1:])
    assert [n for n, _ in gg.penalty.penalised_parameters(model)] == ["0.weight"]
    report = gg.init.apply(model, "he_normal")
    assert report.changed == ("0.weight", "0.bias")
