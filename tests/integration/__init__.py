"""Loopback integration tests."""
