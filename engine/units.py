"""Sizes in words, for people: light (no torch), so the CLI's parser can use it before any job runs."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Human size with decimal units, as file managers and download pages show them: "9.2 GB"."""
    if abs(n) < 1000:
        return f"{int(n)} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")
