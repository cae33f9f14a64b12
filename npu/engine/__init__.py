"""The resident engine: models kept loaded, a bounded job queue, device workers."""
