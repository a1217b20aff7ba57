"""TensorBoardSink: write a run, read the event file back with tensorboard's own reader, compare."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradguard.errors import ConfigError, InputError
from gradguard.findings import Finding
from gradguard.sinks.base import Sink
from gradguard.sinks.tensorboard import TensorBoardSink, read_scalars


def _accumulator(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _records() -> list[dict[str, float]]:
    return [
        {
            "step": s,
            "loss": 1.0 / (s + 1),
            "grad_norm": 2.0 + s,
            "grad_norm/0.weight": 0.5 * s,
            "update_ratio/0.weight": 1e-3 * (s + 1),
            "act/1/frac_zero": 0.25,
            "lr": 0.1,  # not one of the default prefixes
        }
        for s in range(3)
    ]


def test_scalars_round_trip(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    assert isinstance(sink, Sink)
    for rec in _records():
        sink.on_step(rec)
    sink.on_step({"step": 3, "loss": math.nan, "grad_norm": math.inf})
    sink.close()

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"loss", "grad_norm", "grad_norm/0.weight", "update_ratio/0.weight", "act/1/frac_zero"}
    assert [s for s, _ in scalars["loss"]] == [0, 1, 2, 3]
    assert [v for _, v in scalars["loss"][:3]] == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-6)
    assert math.isnan(scalars["loss"][3][1])
    assert scalars["grad_norm"][3][1] == math.inf
    assert [v for _, v in scalars["grad_norm/0.weight"]] == pytest.approx([0.0, 0.5, 1.0], rel=1e-6)
    assert [v for _, v in scalars["update_ratio/0.weight"]] == pytest.approx([1e-3, 2e-3, 3e-3], rel=1e-6)


def test_prefixes_none_writes_every_numeric_entry(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path, prefixes=None)
    sink.on_step(_records()[0])
    sink.close()
    assert "lr" in read_scalars(tmp_path)


def test_histograms_and_findings(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    values = torch.tensor([0.0, 0.0, 1.0, 2.0, float("nan")])
    sink.on_histogram(5, "act/1", values)
    finding = Finding(
        kind="exploding",
        module="0",
        step=7,
        severity="error",
        message="gradient norm of 0.weight is 1e6, 40 MADs above its recent median",
        advice="clip with gradguard.clip.ClipNorm(1.0)",
        evidence={"grad_norm": 1e6},
    )
    sink.on_finding(finding)
    sink.close()

    acc = _accumulator(tmp_path)
    (hist,) = acc.Histograms("act/1")
    assert hist.step == 5
    assert hist.histogram_value.num == 4  # the NaN is dropped, the four finite values counted
    assert hist.histogram_value.sum == pytest.approx(3.0)
    assert hist.histogram_value.min == 0.0 and hist.histogram_value.max == 2.0

    text_tags = acc.Tags()["tensors"]
    assert "findings/exploding/0/text_summary" in text_tags
    (event,) = acc.Tensors("findings/exploding/0/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 7
    assert "exploding" in text and "ClipNorm(1.0)" in text and "1000000.0" in text


def test_existing_writer_is_shared_not_closed(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer)
    sink.on_step({"step": 0, "loss": 2.0})
    sink.close()
    writer.add_scalar("other", 1.0, 0)  # still open
    writer.close()
    assert set(read_scalars(tmp_path)) == {"loss", "other"}


def test_nothing_written_after_close_and_no_file_before_first_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sink = TensorBoardSink(run)
    assert not run.exists()
    sink.close()
    sink.on_step({"step": 0, "loss": 1.0})
    assert not run.exists()


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="int"):
        TensorBoardSink(3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="prefixes"):
        TensorBoardSink("x", prefixes="loss")
    with pytest.raises(ConfigError, match="flush_secs"):
        TensorBoardSink("x", flush_secs=0)


def test_monitor_run_round_trips_through_tensorboard(tmp_path: Path) -> None:
    """A real ``gg.watch`` run with the sink: every history value is in the event file, unchanged."""
    import gradguard as gg

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.LSTM(8, 8, batch_first=True))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)[0][:, -1].sum(-1)

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gg.watch(net, sinks=[TensorBoardSink(tmp_path)], console=False, log_every=3, sample_every=3)
    for _ in range(6):
        x = torch.randn(5, 7, 4)
        opt.zero_grad()
        loss = (net(x) - 1.0).pow(2).mean()
        loss.backward()
        mon.step(loss)
        opt.step()
    history = mon.history
    mon.close()

    scalars = read_scalars(tmp_path)
    for key in ("loss", "grad_norm", "grad_norm/body.0.weight", "grad_norm/body.2.weight_hh_l0"):
        assert [s for s, _ in scalars[key]] == list(range(6))
        assert [v for _, v in scalars[key]] == pytest.approx([row[key] for row in history], rel=1e-6)
    key = "update_ratio/body.0.weight"
    ratios = [(row["step"], row[key]) for row in history if key in row]
    assert ratios and [s for s, _ in scalars[key]] == [s for s, _ in ratios]
    assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in ratios], rel=1e-6)
    assert scalars["act/body.1/frac_saturated"]  # per-module activation summaries on sampled steps
    # The recurrent module's per-time-step profile, sent as a histogram on the activation schedule.
    acc = _accumulator(tmp_path)
    assert "time_forward/body.2" in acc.Tags()["histograms"]
