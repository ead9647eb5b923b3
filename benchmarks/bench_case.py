"""The record ``benchmarks/step_time.py`` reads from every ``benchmarks/cases_*.py`` module's ``CASES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Case:
    """``ours`` / each of ``peers`` build an optimizer from a parameter list; peers that only take matrices get
    the matrices when ``matrices_only`` (ours then gets the same set)."""

    label: str
    ours: Callable[[list], Any]
    peers: dict[str, Callable[[list], Any]] = field(default_factory=dict)
    matrices_only: bool = False
