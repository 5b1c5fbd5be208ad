"""Stripe webhooks: verified ingest (`views`, `endpoint`), the stored-event lifecycle (`service`),
one handler per event type (`handlers`, wired once in `dispatch`), the Celery task (`tasks`) and
the hand-off to the broker (`publish`). Invoice adjustments live in `billing.adjustments`, the
`flask billing webhooks` commands in `billing.cli.webhooks`.

Stripe delivers at least once, in any order, and anyone can POST to the URL: the view verifies
the signature, stores each event once by its Stripe id and queues it; the task processes it at
most once at a time; handlers re-read Stripe's current state, so order does not matter.
"""
