"""Forward explosion: activations multiplied layer after layer are `exploding` at the layer where the growth
starts (probe and monitor share the test); residual streams and pre-norm transformers stay silent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg
from gradguard.detect.forward import amplifying_run


def test_amplifying_run_against_a_hand_computed_product() -> None:
    stds = [("a", 1.0), ("b", 5.0), ("c", 30.0), ("d", 150.0), ("e", 100.0)]
    start, end, product = amplifying_run(stds, None, 2.0, 100.0)  # type: ignore[misc]
    assert (start, end) == (1, 3) and product == pytest.approx(150.0)
    assert amplifying_run(stds, 0.2, 2.0, 100.0)[:2] == (0, 3)  # type: ignore[index]  # ×5 over the input too
    assert amplifying_run(stds, None, 2.0, 100.0, norms={"c"}) is None  # a norm layer resets the reference
    stream = [(f"b{i}", math.sqrt(2.0) ** i) for i in range(30)]  # residual stream: ×√2 per block, ×2^14.5 in all
    assert amplifying_run(stream, 1.0, 2.0, 100.0) is None


def test_one_layer_that_explodes_by_itself_is_named_not_where_the_run_starts() -> None:
    from gradguard.detect.forward import forward_finding

    # The digits CNN whose fc1 overflows float16 (measured at step 80): conv2 x2.48 over conv1, fc1 x3.06e4.
    stds = [("conv1", 0.452), ("conv2", 1.12), ("fc1", 3.43e4), ("fc2", 3.0e4)]
    f = forward_finding(stds, None, 2.0, 100.0, 80, True)
    assert f is not None and f.module == "fc1" and f.evidence["growth"] == pytest.approx(3.43e4 / 0.452)
    assert f.evidence["gains"]["fc1"] == pytest.approx(3.43e4 / 1.12) and "`fc1` alone" in f.message
    # Weights x10 at init: x5-7 at every layer, none x100 by itself: the run's start is named.
    f = forward_finding([("c1", 1.0), ("c2", 6.0), ("c3", 36.0), ("c4", 200.0)], None, 2.0, 100.0, 0, True)
    assert f is not None and f.module == "c2" and "alone" not in f.message


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[:n])


def scaled(factor: float) -> Cnn:
    torch.manual_seed(0)
    m = Cnn()
    with torch.no_grad():
        for mod in (m.conv1, m.conv2, m.fc1, m.fc2):
            mod.weight.mul_(factor)
    return m


def test_cnn_with_weights_x10_is_exploding_at_the_first_conv_in_probe_and_monitor() -> None:
    x, y = digits()
    sick, healthy = scaled(10.0), scaled(1.0)
    with torch.no_grad():
        loss_sick = float(F.cross_entropy(sick(x), y))
        loss_healthy = float(F.cross_entropy(healthy(x), y))
    assert loss_sick > 10 * math.log(10) and loss_healthy < 1.5 * math.log(10)  # the fault is real
    found = [f for f in gg.probe(sick, x, targets=y).findings if f.kind == "exploding"]
    assert found and found[0].module == "conv1" and found[0].rank >= 1
    assert 'gg.init.apply(model, "he_normal")' in found[0].advice
    assert not [f for f in gg.probe(healthy, x, targets=y).findings if f.rank >= 1]
    mon = gg.watch(sick, console=False)
    opt = torch.optim.Adam(sick.parameters(), 1e-3)
    for _ in range(3):  # the chance-level test needs level_steps (3) losses
        opt.zero_grad()
        loss = F.cross_entropy(sick(x), y)
        loss.backward()
        mon.step(loss)
        opt.step()
    modules = {(f.kind, f.module) for f in mon.findings if f.rank >= 1}
    assert ("exploding", "conv1") in modules and ("exploding", "") in modules  # growth, and loss ≫ ln 10
    mon.close()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


def test_unnormalised_resnet_and_pre_norm_transformer_are_silent() -> None:
    torch.manual_seed(0)
    resnet = nn.Sequential(nn.Linear(16, 64), *[Block(64) for _ in range(16)], nn.Linear(64, 10))
    x = torch.randn(64, 16)
    with torch.no_grad():
        out_std = float(resnet(x).std())
    assert out_std > 50 * float(x.std())  # the residual stream does grow with depth
    assert not [f for f in gg.probe(resnet, x).findings if f.rank >= 1 and f.kind == "exploding"]
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 8, enable_nested_tensor=False)
    assert not [f for f in gg.probe(encoder, torch.randn(4, 12, 32)).findings if f.kind == "exploding"]
