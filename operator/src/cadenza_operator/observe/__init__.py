"""Seeing and steering runs: per-run logs, the run tree of `cadenza get`, `cadenza
diagnose` and the web console. Read-side code over the engine's client; the CLI, `cadenza
dev` and the operator serve it."""
