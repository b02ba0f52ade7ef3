"""Bundled synthetic tasks with exact, verifiable answers (used by the quickstart and the tests)."""
