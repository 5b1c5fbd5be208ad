"""Stripe webhooks: verified ingest (`views`), the stored-event lifecycle (`service`), one handler
per event type (`handlers`), invoice adjustments (`adjustments`), Celery tasks (`tasks`) and the
`flask billing webhooks|adjustments` commands (`cli`).

Stripe delivers at least once, in any order, and anyone can POST to the URL: the view verifies
the signature, stores each event once by its Stripe id and queues it; the task processes it at
most once at a time; handlers re-read Stripe's current state, so order does not matter.
"""
