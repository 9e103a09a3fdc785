"""Persistence: SQLAlchemy 2 (async) with Alembic migrations; SQLite (WAL) or PostgreSQL."""

from .store import Progress, QuotaExceeded, Store, default_db_url, hash_key, normalise_url, opened

__all__ = ["Progress", "QuotaExceeded", "Store", "default_db_url", "hash_key", "normalise_url", "opened"]
