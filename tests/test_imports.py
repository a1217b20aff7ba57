"""What importing gradguard costs: no torch.distributed.tensor for unsharded models, no torch for ``--help``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gradguard
from gradguard.cli import build_parser

SRC = Path(gradguard.__file__).resolve().parents[1]


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports this checkout's gradguard; return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": ""}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_and_use_without_torch_distributed_tensor() -> None:
    # The whole public API, monitored and clipped steps on a plain model, a probe: none needs DTensor.
    # (No torch.optim optimizer: constructing one makes torch itself import torch._dynamo and DTensor.)
    code = """
import sys
import torch
import gradguard as gg
from gradguard import *
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
mon, clip = gg.watch(model, console=False), gg.clip.ZClip()
x = torch.randn(16, 4)
for _ in range(3):
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    clip(model.parameters())
    mon.step(loss=loss)
mon.close()
gg.probe(model, x)
print("torch.distributed.tensor" in sys.modules)
"""
    assert _run(code) == "False"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_cli_help_and_version_import_no_torch(flag: str) -> None:
    code = f"""
import sys
from gradguard.cli import main
try:
    main([{flag!r}])
except SystemExit:
    pass
print(sorted({{m.partition(".")[0] for m in sys.modules}} & {{"torch", "numpy", "gradguard.lab"}}))
"""
    assert _run(code).splitlines()[-1] == "[]"


def test_lazy_help_lists_every_command_as_registered() -> None:
    # The top-level help built from placeholders equals the one built with every sub-command registered.
    assert build_parser(()).format_help() == build_parser().format_help()


def test_every_public_name_resolves() -> None:
    assert all(getattr(gradguard, name) is not None for name in gradguard.__all__)
    assert set(gradguard.__all__) <= set(dir(gradguard))
    with pytest.raises(AttributeError, match="no_such_name"):
        gradguard.no_such_name  # noqa: B018


@pytest.mark.parametrize("argv", [["lab", "list"], ["report", "DIR"], ["probe", "m.py:f", "--input-shape", "2x3"]])
def test_a_named_command_is_registered_in_full(argv: list[str]) -> None:
    # Naming a command registers its module (``report`` comes with ``lab``); the others stay placeholders.
    args = build_parser(argv[:1]).parse_args(argv)
    assert callable(args.func)
