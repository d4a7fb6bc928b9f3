"""HTTP the way a client outside the process sends it: real curl, and a raw response parser."""

from __future__ import annotations

import subprocess


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one HTTP/1.x response; interim 100s skipped."""
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def curl(*args: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Run real curl; return (status, lower-cased headers, body)."""
    proc = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"curl failed ({proc.returncode}): {proc.stderr.decode()}")
    return parse_response(proc.stdout)


def header_args(headers: dict[str, str]) -> list[str]:
    """``-H 'name: value'`` arguments for curl."""
    return [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]


def ce_headers(
    event_type: str, event_id: str, *, source: str = "/tests", subject: str | None = None
) -> dict[str, str]:
    """Headers of a binary-mode CloudEvent built by hand (not via make_event), JSON data."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": event_type,
        "Content-Type": "application/json",
    }
    if subject:
        headers["ce-subject"] = subject
    return headers
