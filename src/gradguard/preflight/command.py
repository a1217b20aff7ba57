"""``gradguard probe REF --input-shape 32x50x1``: build a model from a factory and probe one random batch."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.adapt import call_model
from gradguard.errors import ConfigError, InputError
from gradguard.preflight.core import probe
from gradguard.preflight.loss import float_tensors
from gradguard.report.files import write_json_atomic

LOSSES = ("default", "mse", "ce")
#: Exit codes shared with :mod:`gradguard.cli`.
EXIT_OK, EXIT_FAILED = 0, 1
FAIL_ON = ("error", "warning", "never")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_factory(ref: str) -> Callable[[], Any]:
    """Resolve ``path/to/file.py:FACTORY`` or ``package.module:FACTORY`` to a callable.

    Raises :class:`ConfigError` with one line naming what could not be found.
    """
    if not isinstance(ref, str) or ref.count(":") < 1:
        raise ConfigError(f"model reference {ref!r} must look like FILE.py:FACTORY or package.module:FACTORY")
    where, _, attr = ref.rpartition(":")
    if not where or not attr.isidentifier():
        raise ConfigError(f"model reference {ref!r} must look like FILE.py:FACTORY or package.module:FACTORY")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model file {where!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_gradguard_probe_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load {where!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error becomes one line
            raise ConfigError(f"importing {where!r} failed: {_first_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"cannot import module {where!r}: {_first_line(exc)}") from exc
        except Exception as exc:
            raise ConfigError(f"importing {where!r} failed: {_first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"{where!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"{ref!r} is not callable")
    return factory


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x50x1"`` → ``(32, 50, 1)``; every size a positive integer."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} must be positive integers joined by 'x', e.g. 32x50x1") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"--input-shape {text!r} must be positive integers joined by 'x', e.g. 32x50x1")
    return shape


def build_model(ref: str) -> nn.Module:
    """Call the factory named by ``ref`` with no arguments and check that it returns an ``nn.Module``."""
    factory = load_factory(ref)
    try:
        model = factory()
    except Exception as exc:
        raise ConfigError(f"factory {ref!r} raised {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _loss_for(kind: str, output: Any, gen: torch.Generator) -> tuple[Tensor | None, Callable[..., Tensor] | None]:
    if kind == "default":
        return None, None
    tensors = float_tensors(output)
    if not tensors:
        raise ConfigError(f"--loss {kind}: the model output holds no floating-point tensor")
    y = tensors[0]
    if kind == "mse":
        # Floating targets of the output's shape: probe() itself uses MSE on the first output tensor.
        return torch.randn(tuple(y.shape), generator=gen).to(y.device, y.dtype), None
    if y.dim() < 1 or y.shape[-1] < 2:
        raise ConfigError(f"--loss ce needs class scores in the last output dimension, got shape {tuple(y.shape)}")
    classes = y.shape[-1]
    target = torch.randint(0, classes, tuple(y.shape[:-1]), generator=gen).to(y.device)

    def ce(out: Any, tgt: Tensor) -> Tensor:
        scores = float_tensors(out)[0]
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), tgt.reshape(-1))

    return target, ce


def run(args: argparse.Namespace) -> int:
    """Body of ``gradguard probe``."""
    shape = parse_shape(args.input_shape)
    if args.time_dim is not None and not -len(shape) <= args.time_dim < len(shape):
        raise ConfigError(f"--time-dim {args.time_dim} is out of range for --input-shape {args.input_shape}")
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(args.seed)
    try:
        x = torch.randn(shape, generator=gen).to(device)
    except RuntimeError as exc:  # e.g. more memory than the machine has
        raise ConfigError(f"--input-shape {args.input_shape} cannot be allocated: {_first_line(exc)}") from exc
    try:
        with torch.no_grad():
            output = call_model(model, x)
    except Exception as exc:  # the user's model: a rejected shape is a usage error, in one line
        raise ConfigError(f"the model rejected an input of shape {args.input_shape}: {_first_line(exc)}") from exc
    targets, loss_fn = _loss_for(args.loss, output, gen)
    report = probe(model, x, targets=targets, loss_fn=loss_fn, time_dim=args.time_dim, seed=args.seed,
                   train=not args.eval)
    print(report.to_markdown())
    out = Path(args.out)
    try:
        html_path = report.to_html(out / "report.html")
        write_json_atomic(out / "report.json", report.to_dict())  # strict JSON: NaN is spelled "nan"
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r} is not writable: {exc.strerror or exc}") from None
    print(f"wrote {html_path} and {out / 'report.json'}", file=sys.stderr)
    worst = max((f.rank for f in report.findings), default=-1)
    threshold = {"error": 2, "warning": 1, "never": 99}[args.fail_on]
    return EXIT_FAILED if worst >= threshold else EXIT_OK


def register(sub: Any) -> None:
    """Add the ``probe`` sub-command to the ``gradguard`` parser."""
    p = sub.add_parser(
        "probe",
        help="diagnose a model on one random batch before training",
        description=("Build a model by calling FACTORY() and run one forward and backward pass on a random batch; "
                     "print the per-layer table and findings and write report.html and report.json."),
    )
    p.add_argument("model", metavar="REF", help="FILE.py:FACTORY or package.module:FACTORY")
    p.add_argument("--input-shape", required=True, help="batch shape, e.g. 32x50x1")
    p.add_argument("--time-dim", type=int, default=None, help="input dimension that indexes time (e.g. 1)")
    p.add_argument("--loss", choices=LOSSES, default="default",
                   help="default: fixed random projection of the output; mse/ce: against random targets")
    p.add_argument("--out", default="gradguard-probe", help="folder for report.html and report.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch, the targets and the projection")
    p.add_argument("--eval", action="store_true", help="probe in eval mode (default: training mode)")
    p.add_argument("--fail-on", choices=FAIL_ON, default="error",
                   help="exit 1 when a finding of this severity or worse is found (default: error)")
    p.set_defaults(func=run)
