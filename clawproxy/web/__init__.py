"""The HTTP side: resource tree, relay, admin, metrics."""
