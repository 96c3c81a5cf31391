"""Loupe: a self-hosted image-upscaling server with an OpenAI-compatible API."""
