"""Adapters between engine jobs (plain functions on worker threads) and the Qt event loop."""

from app.workers.job import Job, find_job, format_duration

__all__ = ["Job", "find_job", "format_duration"]
