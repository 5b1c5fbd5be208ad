"""Celery settings for billing workers and beat, derived from billing.config (the environment).

Run a worker:  celery -A billing.celery_app worker -Q "$STRIPE_BILLING_QUEUE" --loglevel INFO
Run beat:      celery -A billing.celery_app beat --loglevel INFO
"""

from celery.schedules import crontab

from billing.config import load_settings

_settings = load_settings()

broker_url = _settings.celery_broker_url
result_backend = _settings.celery_result_backend
# Redis redelivers an unacknowledged task after the visibility timeout; with acks_late a flush
# still running then would start again on a second worker. It must outlast the lock TTL and the
# longest flush (config.py enforces visibility timeout > lock TTL).
broker_transport_options = {"visibility_timeout": _settings.broker_visibility_timeout_seconds}
result_backend_transport_options = {"retry_policy": {"max_retries": 3, "interval_start": 0.2}}
broker_connection_retry_on_startup = True

task_default_queue = _settings.billing_queue
task_routes = {"billing.*": {"queue": _settings.billing_queue}}
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True
imports = ("billing.tasks",)

# The hourly usage flush runs at minute 13 (the operations guide's schedule).
beat_schedule = {
    "billing-hourly-usage-flush": {
        "task": "billing.usage.flush_hourly",
        "schedule": crontab(minute=13),
        "options": {"queue": _settings.billing_queue},
    },
}
