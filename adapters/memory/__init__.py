"""In-memory adapters for tests and examples."""
