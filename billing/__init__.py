"""billing: bills a Flask SaaS's usage to Stripe Billing meter events, exactly once, after the fact.

`create_app()` builds the Flask app (`flask --app billing billing --help`), `Billing(app)` adopts an
existing one, and `billing.celery_app` is the Celery app, configured from the same settings.

Layers, lowest first. A module imports modules of its own layer or of lower ones only, inside
functions too (tests/test_structure.py reads this table and checks every import):

    foundation:  errors masking config logs models db metrics migrations task_names
    infra:       ops_records rate_limits stripe_gateway publish_transport broker runtime celery_app
                 accounts
    checks:      checks
    usage:       usage
    billing:     adjustments entitlements
    webhooks:    webhooks
    ops:         ops demo.seed
    cli:         cli
    app:         app gunicorn_conf
    demo:        demo

`billing.emulator` stands apart: it imports nothing of billing outside itself, and nothing of
billing imports it. The package itself (this file) only re-exports the top.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Billing", "celery_app", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import billing.config` (e.g. from a celeryconfig) stays cheap and cycle-free.
    if name in ("create_app", "Billing"):
        from billing import app

        return getattr(app, name)
    if name == "celery_app":
        from billing.celery_app import celery_app

        return celery_app
    raise AttributeError(f"module 'billing' has no attribute {name!r}")
