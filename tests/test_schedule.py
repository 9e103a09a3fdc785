"""Bytes-and-clocks tier: the pure scheduler and absorption, without any socket or event loop."""

from __future__ import annotations

import ast
import random
from pathlib import Path

from sounding.absorb import absorb
from sounding.address import parse_address
from sounding.courtesy.pool import Rep, Source, SourcePool
from sounding.courtesy.profiles import Profile
from sounding.dns import MxHost, MxResult, MxStatus
from sounding.schedule import (
    ConductStats,
    DomainBook,
    Feedback,
    GiveUp,
    HostLimiter,
    ReceiverQueue,
    Recipient,
    Start,
    Wait,
    decide,
)
from sounding.settings import Settings
from sounding.smtp.client import SessionResult, Transcript
from sounding.smtp.reply import Reply
from sounding.smtp.session import SessionOutcome
from sounding.verdict import Reason, Status

SRC = Path(__file__).resolve().parents[1] / "src" / "sounding"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _mx(host: str = "mx.a.example") -> MxResult:
    return MxResult("a.example", MxStatus.OK, (MxHost(host, 10, ("127.0.0.9",)),))


def _client(addr: str, now: float) -> Recipient:
    return Recipient(parse_address(addr), "client", [0], [addr], first_seen=now)


def test_pure_modules_import_no_io() -> None:
    banned = {"asyncio", "socket", "ssl", "sqlalchemy", "procrastinate", "psycopg"}
    for path in [*sorted((SRC / "schedule").glob("*.py")), SRC / "absorb.py"]:
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not _type_checking_only(tree, node):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for n in names:
                assert n.split(".")[0] not in banned, (path.name, n)
                assert "store" not in n.split(".") and "client" not in n.split("."), (path.name, n)


def _type_checking_only(tree: ast.Module, node: ast.ImportFrom) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING":
            if node in list(ast.walk(top)):
                return True
    return False


def test_limiter_window_budget_and_feedback() -> None:
    clock = Clock()
    lim = HostLimiter(Profile("x", max_sessions=2, session_gap=1.0, unknown_per_minute=3), 10.0, clock)
    assert lim.ready_in() == 0 and lim.budget() == 3
    lim.start(2)
    assert lim.budget() == 1 and lim.ready_in() == 1.0  # session gap
    clock.t += 1
    lim.start(1)
    assert lim.ready_in() == 0.05  # window full (2 sessions)
    lim.finish(2, 2)
    lim.finish(1, 1)
    clock.t += 1
    assert lim.budget() == 0 and lim.ready_in() == 9.0  # the unknowns age out 10 s after they came
    clock.t += 9.01
    assert lim.budget() == 3
    lim.apply(Feedback("slow_down", 30.0, rcpt_limit=4))
    assert lim.limit == 1 and lim.ready_in() == 30.0 and lim.total_limit == 4
    for _ in range(10):
        lim.apply(Feedback("recover"))
    assert lim.limit == 2 and lim.backoff == 0.0


def test_limiter_state_moves_to_another_clock() -> None:
    a, b = Clock(1000.0), Clock(5.0)  # two processes, two monotonic clocks
    p = Profile("x", max_sessions=3, session_gap=2.0, unknown_per_minute=4)
    lim = HostLimiter(p, 60.0, a)
    lim.start(0)
    lim.finish(0, 3)
    lim.slow_down(20.0)
    a.t += 5
    moved = HostLimiter.from_dict(lim.to_dict(), p, b)
    assert moved.budget() == lim.budget() == 1
    assert abs(moved.ready_in() - lim.ready_in()) < 1e-9 and moved.ready_in() == 15.0
    assert moved.limit == 2
    b.t += 55.01  # the unknowns were 5 s old: they leave the window 55 s later
    assert moved.budget() == 4


def test_decide_composes_probes_first_and_respects_the_window() -> None:
    clock = Clock()
    pool = SourcePool([Source.parse("192.0.2.1")], clock=clock)
    domains = DomainBook(3600, clock, rng=random.Random(1))
    q = ReceiverQueue(_mx(), "mx.a.example", Profile("default", max_sessions=1, rcpts_per_session=3))
    lim = HostLimiter(q.profile, 60.0, clock)
    q.add([_client(f"u{i}@a.example", clock.t) for i in range(5)])
    act = decide(q, lim, pool, domains, clock.t)
    assert isinstance(act, Start)
    kinds = [r.kind for r in act.chunk]
    assert kinds[:2] == ["postmaster", "probe"] and kinds.count("client") == 3
    assert act.source.key == "192.0.2.1" and q.running == 1
    nxt = decide(q, lim, pool, domains, clock.t)
    assert isinstance(nxt, Wait) and nxt.seconds == 0.05  # one session at a time
    # the state of the queue survives a handover
    again = ReceiverQueue.from_dict(q.to_dict(clock.t), q.profile, 7.0)
    assert [r.rcpt for r in again.queue] == ["u3@a.example", "u4@a.example"]
    pool.pause("mx.a.example", "test")
    lim.finish(act.reserve, 0)
    q.running = 0
    assert isinstance(decide(q, lim, pool, domains, clock.t), GiveUp)
    assert isinstance(decide(q, lim, pool, domains, clock.t, may_start=lambda: False), Wait)


def _result(replies: dict[str, Reply], *, fatal: Reply | None = None) -> SessionResult:
    from sounding.smtp.classify import classify

    out = SessionOutcome(greeting=Reply(220, ("hi",)), replies=replies, fatal=fatal,
                         fatal_class=classify(fatal) if fatal else None)
    return SessionResult("mx.a.example", "127.0.0.9", "192.0.2.1", out, Transcript())


def test_absorb_waits_for_the_catch_all_probe_and_counts_unknowns() -> None:
    clock = Clock()
    s = Settings()
    domains = DomainBook(3600, clock, rng=random.Random(2))
    pool = SourcePool([Source.parse("192.0.2.1")], clock=clock)
    alice, nobody = _client("alice@a.example", clock.t), _client("nobody@a.example", clock.t)
    probes = domains.probes(alice.parsed)
    chunk = [*probes, alice, nobody]
    ok, no = Reply(250, ("ok",), (2, 1, 5)), Reply(550, ("no such user",), (5, 1, 1))
    res = _result({probes[0].rcpt: ok, probes[1].rcpt: no, alice.rcpt: ok, nobody.rcpt: no})
    stats = ConductStats()
    a = absorb(chunk, res, receiver="mx.a.example", source="192.0.2.1", domains=domains, pool=pool,
               stats=stats, settings=s, now=clock.t, wall_now=clock.t)
    got = {j.rcpt: v for j, v in a.final}
    assert got["alice@a.example"].status is Status.DELIVERABLE  # the probe came first: no wait
    assert got["nobody@a.example"].reason is Reason.NO_MAILBOX
    assert a.unknowns == 2 and a.feedback.kind == "recover" and a.settled_domains == ["a.example"]
    assert not a.awaiting and not a.requeue


def test_absorb_block_retries_once_from_another_source_then_pauses() -> None:
    clock = Clock()
    s = Settings()
    domains = DomainBook(3600, clock)
    pool = SourcePool([Source.parse("192.0.2.1"), Source.parse("192.0.2.2")], clock=clock)
    bob = _client("bob@a.example", clock.t)
    block = Reply(554, ("5.7.1 Service unavailable; client host blocked using zen.spamhaus.org",), (5, 7, 1))
    stats = ConductStats()
    a = absorb([bob], _result({}, fatal=block), receiver="r", source="192.0.2.1", domains=domains, pool=pool,
               stats=stats, settings=s, now=clock.t, wall_now=clock.t)
    assert a.requeue == [bob] and bob.block_retries == 1 and not a.final
    assert pool.state("192.0.2.1", "r").rep is Rep.COOLING
    a = absorb([bob], _result({}, fatal=block), receiver="r", source="192.0.2.2", domains=domains, pool=pool,
               stats=stats, settings=s, now=clock.t, wall_now=clock.t)
    assert [v.reason for _, v in a.final] == [Reason.IP_BLOCKED] and pool.paused_until("r") is not None
    assert (stats.blocks, stats.quarantines, stats.paused_receivers) == (2, 2, 1)
