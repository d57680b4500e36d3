"""Real datasets (placeholder)."""
