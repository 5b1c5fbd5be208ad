"""The Celery app, configured from the top-level `celeryconfig.py` (which reads billing.config)."""

from celery import Celery

celery_app = Celery("billing")
celery_app.config_from_object("celeryconfig")
