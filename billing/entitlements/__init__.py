"""Entitlements: which features (Stripe lookup keys) an organization holds, and the `saas` gate.

`service` keeps the local `entitlements` table (fed by Stripe and by manual grants) and answers
`has_entitlement`; `gate` guards a host app's workspace routes with it and runs the upgrade flow.
"""

SAAS_FEATURE = "saas"
