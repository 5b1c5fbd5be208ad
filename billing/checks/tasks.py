"""The scheduled contract check's Celery task (beat, minute 3). Its name is a wire contract."""

from __future__ import annotations

from typing import Any

from celery import Task

from billing.celery_app import celery_app
from billing.checks.validation import validate_contract_scheduled
from billing.runtime import get_runtime
from billing.task_names import VALIDATE_CONTRACT_TASK


@celery_app.task(name=VALIDATE_CONTRACT_TASK, bind=True, acks_late=True, ignore_result=True)
def validate_contract(self: Task) -> dict[str, Any]:
    """The billable_events contract checks on a schedule; failures are logged and counted."""
    return validate_contract_scheduled(get_runtime())
