"""Models the seed demonstrations need that torch lacks."""

from gradguard.nn.lstm import LSTM

__all__ = ["LSTM"]
