"""The OpenAI-compatible HTTP API over the serving engine (FastAPI). ``create_app``
builds the app; ``polyadapter serve`` (``polyadapter.cli.serve``) runs it with
uvicorn."""
from .app import Settings, create_app
from .auth import Keys

__all__ = ["Settings", "create_app", "Keys"]
