"""Process identity that survives pid reuse, so a restarted handler can tell whose work is whose.

A pid alone is not an identity: after a restart the kernel may hand the same number to a new
process. ``pid:start_ticks`` (from ``/proc/<pid>/stat``) is. Where ``/proc`` is missing the token
degrades to the pid and liveness to ``os.kill(pid, 0)``.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start ticks) of a process, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], rest[19]


def token(pid: int | None = None) -> str:
    """``pid:start_ticks`` for ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    if not Path("/proc").is_dir():
        return str(pid)
    stat = _stat(pid)
    return f"{pid}:{stat[1]}" if stat else f"{pid}:gone"


def alive(process_token: str) -> bool:
    """True while the process named by ``process_token`` exists and is not a zombie."""
    pid_text, _, ticks = process_token.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if not Path("/proc").is_dir() or not ticks:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _stat(pid)
    return stat is not None and stat[1] == ticks and stat[0] not in ("Z", "X")
