"""Backend registry, health prober and upstream agent."""
