"""The service: storage-backed bulk jobs, the HTTP API and the web pages."""

from .api import create_app
from .core import Service, parse_upload

__all__ = ["Service", "create_app", "parse_upload"]
