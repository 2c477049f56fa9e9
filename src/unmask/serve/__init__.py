"""Serving: an OpenAI-compatible HTTP server that decodes concurrent requests together, and a page that shows the denoising."""
