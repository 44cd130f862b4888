"""The test suite: unit tests of the pure parts, and integration tests against the real stack (conftest.py)."""
