"""The seeded soak: many runs while engines, agents and nats-server are killed and restarted."""
