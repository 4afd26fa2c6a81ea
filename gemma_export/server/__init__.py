"""The OpenAI-compatible server: `engine` schedules (continuous batching, no HTTP), `http`
parses, validates and streams (no model), `metrics` holds the Prometheus series."""
