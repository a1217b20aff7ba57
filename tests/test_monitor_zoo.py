"""The zoo: every sick setup is first measured to be sick, then must get the exact (kind, module) finding;
the healthy controls must train and stay silent (nothing of severity warning or worse)."""

from __future__ import annotations

import pytest
from zoo import HEALTHY, SICK

import gradguard as gg

#: Pass in which the non-finite value must be found to be born.
PHASE = {"nan_in_custom_forward": "forward", "inf_in_backward": "backward"}


def test_zoo_has_at_least_eight_sick_setups() -> None:
    assert len(SICK) >= 8
    assert {k for s in SICK for k in [SICK[s]().expect[0]]} >= {  # type: ignore[index]
        "exploding",
        "vanishing",
        "nonfinite",
        "dead_units",
        "saturation",
        "loss_spike",
    }


@pytest.mark.parametrize("name", sorted(SICK))
def test_sick_setup_gets_the_exact_finding(name: str) -> None:
    s = SICK[name]()
    mon = gg.watch(s.model, console=False)
    s.run(mon)
    assert s.sick(s), f"{name} did not actually get sick: losses {s.losses[:5]}...{s.losses[-5:]}"
    assert s.expect is not None
    kind, module = s.expect
    hits = [f for f in mon.findings if (f.kind, f.module) == (kind, module)]
    assert hits, f"expected {kind} at {module!r}, got {[(f.kind, f.module, f.severity) for f in mon.findings]}"
    (f,) = hits
    assert f.rank >= 1  # warning or error
    assert any(ch.isdigit() for ch in f.message)  # measured numbers in the message
    assert "gg." in f.advice or "torch" in f.advice  # a concrete call to make
    if name in PHASE:
        assert f.evidence["phase"] == PHASE[name]
    mon.close()


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_control_is_silent(name: str) -> None:
    s = HEALTHY[name]()
    mon = gg.watch(s.model, console=False)
    s.run(mon)
    assert not s.sick(s), f"{name} did not train: loss {s.losses[0]:.3g} → {s.losses[-1]:.3g}"
    loud = [(f.kind, f.module, f.severity, f.message) for f in mon.findings if f.rank >= 1]
    assert loud == []
    mon.close()
