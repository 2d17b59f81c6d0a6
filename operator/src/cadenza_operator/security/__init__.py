"""Who may do what on the bus: NATS credentials and the permissions of each role."""
