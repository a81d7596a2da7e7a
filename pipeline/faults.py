"""Testing hook for crash safety: `GSP_FAULT=<point>:<n>` SIGKILLs the process the n-th time it
passes `point`, so tests can kill a harvest at exact places (mid-shard, between data and commit)."""

import os
import signal

_counts: dict[str, int] = {}


def fault(point: str) -> None:
    spec = os.environ.get("GSP_FAULT", "")
    if not spec.startswith(point + ":"):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(spec.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
