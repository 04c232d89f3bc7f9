"""Pure policy: no reactor, no I/O."""
