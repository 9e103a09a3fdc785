"""Sandbox worlds for the benchmarks (deterministic for a given seed)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from sounding.sandbox import World


def _add_receiver(w: World, addrs: list[tuple[str, str]], dom: str, personality: str, *, delay: float,
                  pipelining: bool, good: list[str], bad: list[str]) -> None:
    """``dom`` on an MX host of its own (``mx.<dom>``) that waits ``delay`` before every reply
    (greeting included), with mailboxes ``good`` and unknown ``bad``; appends each of its
    addresses with its true status to ``addrs``."""
    host = f"mx.{dom}"
    w.add_host(host, personality, reply_delay=delay, greeting_delay=delay, pipelining=pipelining)
    w.add_domain(dom, mx=[(10, host)], mailboxes=good, unknown=bad)
    for lp in good + bad:
        a = f"{lp}@{dom}"
        addrs.append((a, w.truth(a).status))


def throughput_world(domains: int = 300, per_domain: int = 10, *, delay: float = 0.04,
                     pipelining_share: float = 0.7, catch_all_share: float = 0.1,
                     unknown_per_domain: int = 2, seed: int = 7) -> tuple[World, list[tuple[str, str]]]:
    """``domains`` domains, each on its own MX host that waits ``delay`` before every reply.

    Returns the world and the list ``[(address, true status), ...]`` in a shuffled order
    (lists arrive unsorted). Per domain: ``per_domain - unknown_per_domain`` mailboxes
    that exist and ``unknown_per_domain`` that do not; a share of the hosts are catch-all.
    """
    rng = random.Random(seed)
    w = World()
    addrs: list[tuple[str, str]] = []
    n_pipe = round(domains * pipelining_share)
    n_catch = round(domains * catch_all_share)
    for i in range(domains):
        personality = "catch_all" if i % max(1, domains // max(1, n_catch)) == 0 and n_catch else "honest"
        pipelining = rng.random() < n_pipe / domains
        good = [f"user{j}" for j in range(per_domain - unknown_per_domain)]
        bad = [f"gone{j}" for j in range(unknown_per_domain)]
        _add_receiver(w, addrs, f"tp{i:04d}.example", personality, delay=delay, pipelining=pipelining,
                      good=good, bad=bad)
    rng.shuffle(addrs)
    return w, addrs


def streaming_world(domains: int = 2000) -> World:
    """A zero-latency world for the memory benchmark: every ``u<N>`` mailbox exists."""
    w = World()
    for i in range(domains):
        dom = f"m{i:05d}.example"
        w.add_host(f"mx.{dom}", "honest")
        w.add_domain(dom, mx=[(10, f"mx.{dom}")], mailboxes=[f"u{j}" for j in range(600)])
    return w


def streaming_addresses(n: int, domains: int = 2000) -> Iterator[str]:
    """``n`` addresses spread over the streaming world's domains (some repeat: real lists do)."""
    for k in range(n):
        yield f"u{(k // domains) % 600}@m{k % domains:05d}.example"


def wide_world(domains: int = 1500, min_per: int = 1, max_per: int = 5, *, delay: float = 0.04,
               pipelining_share: float = 0.7, catch_all_share: float = 0.1, unknown_share: float = 0.25,
               seed: int = 12) -> tuple[World, list[tuple[str, str]]]:
    """The long tail of a B2B list: ``domains`` domains with ``min_per``-``max_per`` addresses each.

    Every domain has its own MX host that waits ``delay`` before every reply (greeting
    included); ``pipelining_share`` of them announce PIPELINING, ``catch_all_share`` accept
    every recipient. About ``unknown_share`` of the addresses do not exist. Returns the world
    and ``[(address, true status), ...]`` shuffled (issue 12's world).
    """
    rng = random.Random(seed)
    w = World()
    addrs: list[tuple[str, str]] = []
    for i in range(domains):
        personality = "catch_all" if rng.random() < catch_all_share else "honest"
        pipelining = rng.random() < pipelining_share
        n = rng.randint(min_per, max_per)
        good: list[str] = []
        bad: list[str] = []
        for j in range(n):
            (bad if rng.random() < unknown_share else good).append(f"p{j}.{rng.randrange(10**6)}")
        _add_receiver(w, addrs, f"w{i:05d}.example", personality, delay=delay, pipelining=pipelining,
                      good=good, bad=bad)
    rng.shuffle(addrs)
    return w, addrs
