"""Loopback helpers every test folder shares: one copy of each, imported as ``tests.support.*``."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
