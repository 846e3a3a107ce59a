"""MIG unit tests."""
