"""Small shared utilities (metrics, timing)."""
