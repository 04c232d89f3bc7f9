"""The response cache: exact and semantic matching, storage, replay."""
