"""The Celery task names: a wire contract (beat entries, queued messages, Flower), never renamed.

Apart from `billing.celery_app` so a process that only names a task (the web process's
publisher) does not import Celery.
"""

FLUSH_HOURLY_TASK = "billing.usage.flush_hourly"
SUBMIT_PARTS_TASK = "billing.usage.submit_parts"
WEBHOOK_PROCESS_TASK = "billing.webhooks.process"
WEBHOOK_SWEEP_TASK = "billing.webhooks.sweep"
VALIDATE_CONTRACT_TASK = "billing.contract.validate"
RECONCILE_TASK = "billing.usage.reconcile"
RECONCILE_ERROR_REPORTS_TASK = "billing.usage.reconcile_error_reports"
