"""Where monitor output goes: the :class:`Sink` interface and the built-in JSONL and console sinks."""

from gradguard.sinks.base import Sink
from gradguard.sinks.console import ConsoleSink
from gradguard.sinks.jsonl import JsonlSink

__all__ = ["ConsoleSink", "JsonlSink", "Sink"]

