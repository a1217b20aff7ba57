"""Realistic training programs, written the way practitioners write them, shared by the tests and
``benchmarks/diagnosis.py``: each module has ``run(fault=None, steps=..., seed=..., monitor_factory=None,
guard_factory=None) -> RunResult`` and its ``FAULTS``; run one as a script with
``cd tests && python -m programs.<name> --fault <fault>``.
"""
