"""The opt-out registry in the store: what the command line, the library and the service read.

Older versions of ``sounding exempt`` kept a JSON file in the state directory; its entries are
imported into the store once (the file is then renamed ``exemptions.json.imported``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from ..courtesy.exemptions import Exemption, ExemptionRegistry, Kind, read_legacy_json
from ..settings import Settings
from .models import ExemptionRow
from .store import Store, normalise_url, opened

LEGACY_FILE = "exemptions.json"


def as_exemption(row: ExemptionRow) -> Exemption:
    """A stored row as a registry entry."""
    kind: Kind = row.kind if row.kind in ("domain", "mx", "cidr") else "domain"  # type: ignore[assignment]
    return Exemption(kind, row.value, row.note, row.added)


async def import_legacy(store: Store, state_dir: Path | None) -> int:
    """Import the state directory's old JSON registry once; the number of entries taken."""
    if state_dir is None:
        return 0
    path = state_dir / LEGACY_FILE
    if not path.exists():
        return 0
    n = 0
    for e in read_legacy_json(path):
        await store.add_exemption(e.kind, e.value, e.note or "imported", "import", state="active",
                                  proof=f"operator (imported from {path.name})")
        n += 1
    path.replace(path.with_name(LEGACY_FILE + ".imported"))
    return n


def _sqlite_path(url: str) -> Path | None:
    url = normalise_url(url)
    if not url.startswith("sqlite") or "///" not in url:
        return None
    p = url.split("///", 1)[1]
    return None if not p or p == ":memory:" else Path(p)


async def active_entries(url: str, state_dir: Path | None = None) -> list[Exemption]:
    """The active entries of the store at ``url`` (after a one-time import of the state
    directory's JSON file). A default SQLite file that does not exist yet holds no entries:
    it is not created just to be read."""
    path = _sqlite_path(url)
    legacy = state_dir is not None and (state_dir / LEGACY_FILE).exists()
    if path is not None and not path.exists() and not legacy:
        return []
    async with opened(url) as st:
        await import_legacy(st, state_dir)
        return [as_exemption(r) for r in await st.exemptions("active")]


def store_loader(settings: Settings) -> Callable[[], Awaitable[list[Exemption]]]:
    """What a :class:`ExemptionRegistry` built from ``settings`` loads: the store's entries."""
    url = settings.store_url
    state = settings.data_dir

    async def load() -> list[Exemption]:
        return await active_entries(url, state)
    return load


def registry_for(settings: Settings) -> ExemptionRegistry:
    """The opt-out registry a verifier built from ``settings`` honours (``Verifier(Settings())``)."""
    return ExemptionRegistry(loader=store_loader(settings))
