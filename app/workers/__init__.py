"""Adapters between engine jobs (plain functions on worker threads) and the Qt event loop."""

from app.workers.job import Job, format_duration

__all__ = ["Job", "format_duration"]
