"""Test support shipped with the package: tiny random models built locally (no download)."""
