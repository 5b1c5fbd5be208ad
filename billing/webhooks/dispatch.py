"""The one place that runs a stored event through its handler: the processing task and
`flask billing webhooks replay` both come here, with the same handler table and the same rule
for what is worth a retry."""

from __future__ import annotations

from billing.runtime import Runtime
from billing.webhooks import handlers, service


def process(runtime: Runtime, event_id: str, *, final_attempt: bool) -> service.ProcessOutcome:
    """Run the event's handler once; a transient error is re-raised unless `final_attempt`."""
    return service.process_event(
        runtime,
        event_id,
        handlers.HANDLERS,
        final_attempt=final_attempt,
        transient_errors=handlers.TRANSIENT_ERRORS,
    )


def replay(
    runtime: Runtime, event_id: str, *, force: bool = False
) -> tuple[str, service.ProcessOutcome]:
    """A stored event's handler run again now (a dead letter once its cause is fixed): its
    status before, and what happened. `force` re-runs one already processed."""
    previous = service.reset_for_replay(runtime, event_id, force=force)
    return previous, process(runtime, event_id, final_attempt=True)
