"""The train task's last word: why it failed, in the container's termination message file.

When a container ends, the kubelet reads ``/dev/termination-log`` (a Pod's
``terminationMessagePath``) into the container's status, and Argo and KFP show it as the failed
task's error (``run_details.task_details[].error.message`` in the KFP API). It is the one channel
that still works when the cause is S3 itself refusing writes, so result.json cannot be written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

DEFAULT_PATH: Final = "/dev/termination-log"
# Where the message goes instead (the KFP stand-in gives each task its own file, as the kubelet
# gives each container one).
PATH_ENV: Final = "KFP_TRAINER_TERMINATION_LOG"
MAX_BYTES: Final = 4096  # the kubelet keeps at most this much of the message


def write_termination_message(message: str) -> bool:
    """Write ``message`` where the kubelet reads it; False when there is no such file here
    (a local run) or it cannot be written. Never raises: the failure being reported matters more.
    """
    path = Path(os.environ.get(PATH_ENV) or DEFAULT_PATH)
    if not path.parent.is_dir() or (path == Path(DEFAULT_PATH) and not path.exists()):
        return False
    data = message.encode("utf-8", "replace")[:MAX_BYTES]
    try:
        with path.open("wb") as f:
            f.write(data)
    except OSError:
        return False
    return True


__all__ = ["DEFAULT_PATH", "MAX_BYTES", "PATH_ENV", "write_termination_message"]
