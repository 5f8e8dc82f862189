"""Validate: judge any NVFP4 checkpoint from its files alone."""

from modelopt_streaming.validate.checks import validate
from modelopt_streaming.validate.report import GroupStats, Report

__all__ = ["GroupStats", "Report", "validate"]
