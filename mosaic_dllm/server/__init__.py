"""OpenAI-compatible HTTP serving (`mosaic serve`): FastAPI app, admission by memory plan, one engine worker."""

from .app import create_app

__all__ = ["create_app"]
