"""Adapters between engine jobs (plain functions on worker threads) and the Qt event loop."""

from app.workers.job import Job

__all__ = ["Job"]
