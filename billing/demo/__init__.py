"""The demo kit: demo data in Stripe test mode (`seed`, `flask billing seed_demo`, scripts/demo.sh)
and the demo host app behind the SaaS gate (`host_app`, scripts/demo_saas.sh). `seed` writes
through the services like an operator command (the CLI runs it); `host_app` sits above everything
it shows, and nothing of billing imports it."""
