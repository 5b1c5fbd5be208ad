"""bench/flush.py when its flush child fails: the child's stderr is shown and the bench fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.process import BIN, ROOT


def test_a_failed_flush_child_shows_why(tmp_path):
    output = tmp_path / "flush.json"
    completed = subprocess.run(  # an unknown log level: the child's logging set-up raises
        [
            str(BIN / "python"),
            "bench/flush.py",
            "--sizes",
            "200",
            "--orgs",
            "2",
            "--hours",
            "1",
            "--limits",
            "off",
            "--log-level",
            "NOT_A_LEVEL",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "flush child failed (exit 1)" in completed.stderr
    assert "Unknown level: 'NOT_A_LEVEL'" in completed.stderr  # the child's own traceback
    assert "CalledProcessError" not in completed.stderr
    assert not output.exists()  # no report of a run that did not happen
    pointer = "the flush's log: "
    [kept] = [line for line in completed.stderr.splitlines() if line.startswith(pointer)]
    Path(kept.removeprefix(pointer)).unlink()  # pointed to, so it exists
