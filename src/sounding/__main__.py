"""``python -m sounding``."""

from .cli import app

app()
