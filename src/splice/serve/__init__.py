"""Serving many adapters over one base model: a continuous-batching engine
(`splice.serve.engine`) behind an OpenAI-compatible HTTP API (`splice serve`)."""
