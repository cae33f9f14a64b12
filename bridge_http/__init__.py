"""The OpenAI-compatible HTTP bridge: FastAPI routes over the engine's job API."""
