"""bench/webhooks.py end to end at a small size: the figures it reports come from endpoints that
did what they are named for (a benchmark is not a timed test; its speed is not checked here)."""

from __future__ import annotations

import json
import subprocess

from tests.process import BIN, ROOT

QUEUED, SYNCHRONOUS = 200, 40


def test_the_webhook_bench_measures_a_queuing_and_a_processing_endpoint(tmp_path):
    output = tmp_path / "webhooks.json"
    completed = subprocess.run(
        [
            str(BIN / "python"),
            "bench/webhooks.py",
            "--requests",
            str(QUEUED),
            "--sync-requests",
            str(SYNCHRONOUS),
            "--load-tool",
            "python",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = json.loads(output.read_text())
    warmup = result["warmup_deliveries"]
    queued, synchronous = result["queued"], result["synchronous"]
    assert queued["statuses"] == {"200": QUEUED}
    assert synchronous["statuses"] == {"200": SYNCHRONOUS}
    # Queued: every delivery stored and its task on the bench's queue, none processed.
    assert queued["rows_stored"] == queued["tasks_enqueued"] == QUEUED + warmup
    # Synchronous: each delivery processed inside its request.
    assert synchronous["rows_processed"] == SYNCHRONOUS + warmup
    assert result["throughput_ratio"] == round(queued["per_second"] / synchronous["per_second"], 2)
    assert "queued/synchronous throughput" in completed.stdout
