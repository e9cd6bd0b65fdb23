"""Console lines for people watching a run.

Ray Train V2 replaces `print` inside workers with a version that emits each line twice when
stdout is redirected (as it is in a Ray worker), so rayft writes to stdout directly."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    sys.stdout.write(f"[rayft] {message}\n")
    sys.stdout.flush()
