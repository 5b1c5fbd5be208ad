"""This deployment's Celery settings file: billing's own settings, plus whatever you add below.

billing configures its Celery app by itself (`billing.celery_app.celery_config`, from the
environment, read when the worker starts), so `celery -A billing.celery_app worker` needs no file.
Load this one to override a setting for this deployment:

    celery --config celeryconfig -A billing.celery_app worker -Q "$STRIPE_BILLING_QUEUE"
    celery --config celeryconfig -A billing.celery_app beat

It is not part of the installed package, so it never shadows a host application's own
`celeryconfig`.
"""

from billing.celery_app import celery_config
from billing.runtime import get_runtime

globals().update(celery_config(get_runtime().settings))

# Overrides for this deployment go here, e.g.:
# worker_max_tasks_per_child = 100
