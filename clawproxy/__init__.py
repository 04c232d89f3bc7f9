"""clawproxy: an event-driven gateway for AI agents and LLM backends."""

__version__ = "0.1.0"
