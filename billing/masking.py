"""Masking secrets in anything billing prints or logs: Stripe keys, signing secrets and URL
passwords. The foundation every error line and the settings' repr rest on; imports nothing of
billing."""

from __future__ import annotations

import re

# The known prefixes a masked secret keeps; then, for a mistyped one, its first letters.
_KEY_PREFIX = re.compile(r"^(?:(?:sk|rk|pk)_(?:test|live)_|whsec_|(?:sk|rk|pk|whsec)[_-])")


def mask_secret(value: str | None) -> str:
    """`sk_test_…1234`: enough to tell keys apart in logs, never enough to use one. A short one
    keeps no character: four would be most of it."""
    if not value:
        return "<unset>"
    match = _KEY_PREFIX.match(value)
    prefix = match.group(0) if match else ""
    return f"{prefix}…{value[-4:]}" if len(value) - len(prefix) >= 12 else f"{prefix}…"


# Anything shaped like a Stripe secret (mistyped ones too: `sk_tst_…`, `sk-test-…`, a server's
# own `sk_test_****1234`) or a URL password, wherever it appears in a message. Wider than a real
# key's alphabet on purpose: better to mask too much than to leak a tail. A bare prefix holds no
# secret (`sk_live_…9876` is masked already, `after sk_test_` a message's words).
_SECRET_TOKEN = re.compile(r"\b(?:sk|rk|whsec)[_-][A-Za-z0-9_+/=*-]+")
_BARE_PREFIX = re.compile(r"(?:sk|rk)_(?:test|live)_?|whsec_")
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


def scrub(text: str) -> str:
    """Mask Stripe secrets and connection-URL passwords (`redis://:***@host`) in any text."""
    text = _SECRET_TOKEN.sub(_mask_token, text)
    return _URL_PASSWORD.sub(r"\1***@", text)


def _mask_token(match: re.Match[str]) -> str:
    token = match.group(0)
    return token if _BARE_PREFIX.fullmatch(token) else mask_secret(token)


def shown_url(value: str) -> str:
    """A URL fit for an error line: its password masked, even when it is malformed."""
    # Without `://` scrub() cannot find a password: mask whatever precedes an `@`.
    return scrub(value) if "://" in value else re.sub(r"^.*@", "***@", value)
