"""Where monitor output goes: the :class:`Sink` interface and the built-in JSONL, console and TensorBoard sinks."""

from gradguard.sinks.base import Sink
from gradguard.sinks.console import ConsoleSink
from gradguard.sinks.jsonl import JsonlSink
from gradguard.sinks.tensorboard import TensorBoardSink  # imports tensorboard only when instantiated

__all__ = ["ConsoleSink", "JsonlSink", "Sink", "TensorBoardSink"]

