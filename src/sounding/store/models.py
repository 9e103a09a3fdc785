"""The tables (SQLAlchemy 2 declarative).  The schema itself is created by Alembic
(``migrations/versions``); these classes are what the code queries."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Client(Base):
    """An API client; only a hash of its key is kept."""

    __tablename__ = "clients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    key_prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    operator: Mapped[bool] = mapped_column(Boolean, default=False)
    daily_quota: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Usage(Base):
    """Addresses submitted per client per day (quotas)."""

    __tablename__ = "usage"
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    addresses: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    """A bulk verification job."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # queued running done cancelled failed
    filename: Mapped[str] = mapped_column(String(300), default="")
    fmt: Mapped[str] = mapped_column(String(8), default="csv")
    header: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    email_column: Mapped[str] = mapped_column(String(200), default="email")
    total: Mapped[int] = mapped_column(Integer, default=0)
    unique_addresses: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobRow(Base):
    """One input row of a job and, once known, its verdict."""

    __tablename__ = "job_rows"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    line: Mapped[int] = mapped_column(Integer, default=0)
    cells: Mapped[list[Any]] = mapped_column(JSON)
    address: Mapped[str] = mapped_column(String(1000))
    key: Mapped[str] = mapped_column(String(1000))  # what duplicates share
    read_error: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_job_rows_pending", "job_id", "done_at", "key"),
                      Index("ix_job_rows_key", "job_id", "key"), Index("ix_job_rows_key_only", "key"))


class CachedVerdict(Base):
    """The last verdict for an address, reused until it expires."""

    __tablename__ = "verdict_cache"
    key: Mapped[str] = mapped_column(String(1000), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    checked_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class DomainInfo(Base):
    """What we learnt about a domain: its MX and whether it accepts everything."""

    __tablename__ = "domain_cache"
    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    mx_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    catch_all: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    checked_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    #: the probes' replies (postmaster, random: schedule.domains.DomainState.to_dict), so that
    #: the receiver's next owner in a fleet neither asks them again nor loses their evidence
    findings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ExemptionRow(Base):
    """An opt-out entry (domain, MX host name or CIDR): ``active`` entries are honoured;
    ``pending`` ones (shared providers) wait for a DNS proof or an operator's approval."""

    __tablename__ = "exemptions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[str] = mapped_column(String(300))
    note: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16), default="operator")  # operator | web | api | cli | import
    added: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="active", index=True)  # active | pending
    proof: Mapped[str] = mapped_column(String(200), default="")  # how it came to be active
    token: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the DNS TXT proof token
    contact: Mapped[str] = mapped_column(String(300), default="")
    why: Mapped[str] = mapped_column(Text, default="")  # why it waits for proof
    proved_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("uq_exemptions_kind_value", "kind", "value", unique=True),)


class SessionLog(Base):
    """One SMTP session we held: what a receiving administrator's logs will show."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the transcript id
    started: Mapped[float] = mapped_column(Float, index=True)
    ended: Mapped[float] = mapped_column(Float)
    mx_host: Mapped[str] = mapped_column(String(255), index=True)
    mx_ip: Mapped[str] = mapped_column(String(64), index=True)
    source_ip: Mapped[str] = mapped_column(String(128), default="")
    domains: Mapped[str] = mapped_column(Text, default="")  # " a.example b.example "
    job_ids: Mapped[str] = mapped_column(Text, default="")
    commands: Mapped[list[Any]] = mapped_column(JSON)  # [[verb, masked argument, reply code], ...]
    outcome: Mapped[str] = mapped_column(String(200), default="")
    transcript: Mapped[bytes] = mapped_column(LargeBinary)  # zlib-compressed text
    rcpts: Mapped[int] = mapped_column(Integer, default=0)  # RCPT commands sent
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)  # the receiver refused our IP


class AuditEntry(Base):
    """Something an operator did (unpause a receiver, clear a quarantine, approve an opt-out)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(300))
    detail: Mapped[str] = mapped_column(Text, default="")


class KeyValue(Base):
    """Small documents: source-pool reputation, canaries."""

    __tablename__ = "kv"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated: Mapped[float] = mapped_column(Float)


# ---------------------------------------------------------------------------- fleet (PostgreSQL)
class ReceiverLease(Base):
    """Who owns a receiver, fleet-wide: a lease with a fencing token that only ever grows.
    Also the receiver's shared courtesy state (pause, limiter) — merged per receiver."""

    __tablename__ = "receivers"
    receiver: Mapped[str] = mapped_column(String(300), primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)  # the database's clock
    limiter: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    paused_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    paused_why: Mapped[str] = mapped_column(Text, default="")
    declined: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # workers without a usable source
    updated: Mapped[float] = mapped_column(Float, default=0.0)


class WorkItem(Base):
    """An address waiting for its receiver's owner (one row per address, whatever the jobs)."""

    __tablename__ = "work"
    key: Mapped[str] = mapped_column(String(1000), primary_key=True)
    receiver: Mapped[str] = mapped_column(String(300), index=True)
    fresh: Mapped[bool] = mapped_column(Boolean, default=False)  # do not answer from the cache
    created: Mapped[float] = mapped_column(Float)
    #: the fencing token of the owner whose session has it on the wire, and since when
    inflight_token: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    inflight_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class CourtesyPair(Base):
    """Our standing with one receiver from one source (quarantine, ban, last use)."""

    __tablename__ = "courtesy_pairs"
    source: Mapped[str] = mapped_column(String(300), primary_key=True)
    receiver: Mapped[str] = mapped_column(String(300), primary_key=True)
    rep: Mapped[str] = mapped_column(String(16), default="healthy")
    until: Mapped[float] = mapped_column(Float, default=0.0)
    blocks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    detail: Mapped[str] = mapped_column(Text, default="")
    last_used: Mapped[float | None] = mapped_column(Float, nullable=True)
