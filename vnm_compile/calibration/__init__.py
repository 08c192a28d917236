"""Calibration: activation statistics, importance scores, permutations, pattern choice."""

from .importance import SCORES, importance
from .observer import CalibrationStats, ChannelObserver, calibrate, observe_linears, run_batch

__all__ = ["SCORES", "importance", "CalibrationStats", "ChannelObserver", "calibrate", "observe_linears", "run_batch"]
