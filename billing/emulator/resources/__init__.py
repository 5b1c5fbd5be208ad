"""Stripe resources; importing this package registers their routes on `router.router`."""

from billing.emulator.resources import (  # noqa: F401
    checkout,
    core,
    entitlements,
    invoices,
    meter_stream,
    metering,
    subscriptions,
)
