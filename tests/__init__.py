"""clawproxy tests."""
