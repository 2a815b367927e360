"""The state directory: what `lockgate up` leaves for `lockgate status` and for its own restart.

Writes are atomic (write a temp file, fsync, rename), so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path(".lockgate")
"""Where `up`, `status`, `plan` and `rollout` look unless told otherwise (relative to the working dir)."""
TEMPLATE = Path(__file__).resolve().parent.parent / "repo-template"
"""The intent repository a new user starts from (`lockgate init`, the demo)."""
STATUS_FILE = "status.json"
SUSPENDED_FILE = "suspended.json"
"""In the state dir while `lockgate suspend` holds: `{"at", "applied"}` (what a restart serves); here, not in
the loop, so `lockgate suspend` with no `up` running needs no import of the loop."""
ROLLOUTS_DIR = "rollouts"
"""Each rollout's state file, its commands and decisions.jsonl (the controller's; read by the exporter)."""


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(state_dir: Path) -> dict[str, Any]:
    """What `lockgate status --json` prints: the status `up` last wrote, with `lockgate.running` checked now
    (a SIGKILLed `up` leaves its last status behind). FileNotFoundError when no `up` ever wrote one."""
    status: dict[str, Any] = read_json(state_dir / STATUS_FILE)
    status["lockgate"]["running"] = pid_alive(status["lockgate"].get("pid"))
    return status
