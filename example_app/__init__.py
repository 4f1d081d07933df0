"""The demo portal (see issue: the demo portal)."""
