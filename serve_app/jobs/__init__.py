"""Async jobs: records, the runner, callbacks. No torch."""
