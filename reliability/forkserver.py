"""A fork server for kill tests: import torch and gradguard once, then fork one child per job.

Starting a Python process that imports torch costs seconds; forking a warm one costs milliseconds, so a
test can SIGKILL dozens of real gradguard processes at random moments within its time budget. Each child
is an ordinary process running a gradguard command (``gradguard.cli.main(argv)``, exactly what the
console script runs) or a watched training script (:func:`train`), and is killed like any other.

Protocol: one JSON object per line on stdin, one reply per line on stdout.

- ``{"op": "start", "job": "cli", "argv": [...]}`` or ``{"op": "start", "job": "train", "dir": D,
  "steps": N}`` → ``{"pid": PID}``;
- ``{"op": "wait", "pid": PID}`` → ``{"exit": CODE}`` or ``{"signal": SIGNUM}`` (reaps the child);
- ``{"op": "quit"}`` → exits.

Run it as ``python reliability/forkserver.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def train(folder: str, steps: int) -> int:
    """A watched training script: MLP regression with ``gg.watch(log_dir=...)`` and a Guard whose
    snapshots go to disk. Appends to ``<folder>/metrics.jsonl``; writes ``<folder>/done-<pid>`` at the
    end (plain text, atomically) so a test can tell a finished run from a killed one."""
    import torch
    from torch import nn

    import gradguard as gg

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    out = Path(folder)
    with gg.watch(model, log_dir=out, console=False, log_every=5, sample_every=5) as mon:
        guard = gg.Guard(model, opt, monitor=mon, snapshot_dir=out, snapshot_every=20)
        for step in range(steps):
            idx = torch.arange(step * 32, step * 32 + 32) % 256
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            mon.step(loss)
            guard.step(loss)
    tmp = out / f".done-{os.getpid()}.tmp"
    tmp.write_text(f"{steps}\n")
    os.replace(tmp, out / f"done-{os.getpid()}")
    return 0


def _child(job: dict[str, Any]) -> int:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if job["job"] == "cli":
        from gradguard.cli import main

        try:
            return int(main(job["argv"]))
        except SystemExit as exc:
            return int(exc.code or 0)
    return train(job["dir"], int(job["steps"]))


def serve() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # warm: the report renderer draws with it
    import torch

    torch.set_num_threads(1)
    import gradguard
    import gradguard.cli
    import gradguard.lab.registry
    import gradguard.report.render

    del matplotlib, gradguard

    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        if msg["op"] == "start":
            pid = os.fork()
            if pid == 0:  # the child: run the job and leave without running the parent's cleanup
                code = 1
                try:
                    code = _child(msg)
                finally:
                    os._exit(code)
            reply.write(json.dumps({"pid": pid}) + "\n")
        elif msg["op"] == "wait":
            _, status = os.waitpid(int(msg["pid"]), 0)
            if os.WIFSIGNALED(status):
                reply.write(json.dumps({"signal": os.WTERMSIG(status)}) + "\n")
            else:
                reply.write(json.dumps({"exit": os.WEXITSTATUS(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "src"))
    serve()
