"""Service tests use the shared fixtures of tests/conftest.py (a real service process and a
client of it) and the factories of tests/factories.py."""
