"""Reliability campaigns for gradguard: seeded fault injection, control runs and the RELIABILITY.md report.

``python reliability/run.py`` (``make reliability``) runs the full campaign; ``--smoke`` a small one.
"""
