import io
import json

from billing import logs


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_structured_fields():
    stream = io.StringIO()
    logs.configure_logging("INFO", "json", stream=stream)
    with logs.bind(task_id="t-1", task_name="billing.usage.flush_hourly"):
        logs.get_logger("billing.usage").info(
            logs.METER_SUBMIT_SUCCEEDED,
            extra={"organization_id": 7, "idempotency_key": "billing-usage-x", "duration_ms": 12},
        )
    logs.get_logger("billing.webhooks").warning(logs.WEBHOOK_DUPLICATE, extra={"event_id": "evt_1"})
    first, second = _lines(stream)
    assert first["message"] == "Stripe meter event submit succeeded"
    assert first["level"] == "INFO" and first["logger"] == "billing.usage"
    assert (first["organization_id"], first["idempotency_key"]) == (7, "billing-usage-x")
    assert (first["task_id"], first["duration_ms"]) == ("t-1", 12)
    assert "timestamp" in first
    assert second["event_id"] == "evt_1" and "task_id" not in second


def test_text_format_for_people():
    stream = io.StringIO()
    logs.configure_logging("INFO", "text", stream=stream)
    logs.get_logger("billing.usage").info(logs.FLUSH_STARTED, extra={"organization_id": 3})
    line = stream.getvalue().strip()
    assert line.endswith("Stripe usage flush started organization_id=3")


def test_guide_messages_are_verbatim():
    assert logs.FLUSH_NO_PENDING == "Stripe usage flush found no pending events"
    assert logs.WEBHOOK_ALREADY_PROCESSED == "Stripe webhook processing skipped (already processed)"
    assert logs.INVOICE_ADJUSTMENTS_APPLIED == "Stripe invoice.created billing adjustments applied"


def test_stripe_request_lines_only_at_debug():
    import logging

    for level, shown in (("INFO", False), ("DEBUG", True)):
        stream = io.StringIO()
        logs.configure_logging(level, "json", stream=stream, others_level="INFO")
        logging.getLogger("stripe").info("message='Request to Stripe api' method=post")
        logging.getLogger("celery.worker").info("celery@host ready.")
        lines = _lines(stream)
        assert any(line["logger"] == "stripe" for line in lines) is shown
        assert any(line["logger"] == "celery.worker" for line in lines)


def test_bound_fields_follow_work_into_a_thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    stream = io.StringIO()
    logs.configure_logging("INFO", "json", stream=stream)

    def submit(org: int) -> None:
        logs.get_logger("billing.usage").info(
            logs.METER_SUBMIT_ATTEMPT, extra={"organization_id": org}
        )

    with logs.bind(task_id="t-9"), ThreadPoolExecutor(2) as pool:
        list(pool.map(logs.carry_context(submit), [1, 2]))
    assert [line["task_id"] for line in _lines(stream)] == ["t-9", "t-9"]
