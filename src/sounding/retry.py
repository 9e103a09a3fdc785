"""When to ask again (pure): greylisted recipients and dropped sessions.

Greylisting (postgrey, RFC 6647) defers a new (client IP, sender, recipient) triplet for a
while and then accepts it; the retry must come from the same source IP with the same
sender. The schedule has to fit the caller's patience (``max_wait``):

* the server said how long (``Greylisted for 287 seconds``): ask once that has passed, if it
  fits; if it does not, no earlier retry can succeed -- give up at once (courtesy);
* it did not: back off (``first_delay``, then twice as long each time), and when the next
  step would fall past the wait, make one **last retry just before the wait expires**.

A server that hangs up after a few recipients (a dropped session) is asked again once,
later, in a session with at most half as many recipients, and the number it did answer is
fed back as the per-session limit for that receiver.
"""

from __future__ import annotations

from dataclasses import dataclass

#: At most this many greylist retries per recipient (each one is an RCPT the server sees).
MAX_GREYLIST_TRIES = 5
#: Never two tries of one recipient closer together than this (seconds).
MIN_GAP = 5.0
#: A retry after a hint comes this long after the hinted time (clock skew, rounding).
HINT_SLACK = 1.0


def deadline_margin(max_wait: float) -> float:
    """How long before ``max_wait`` expires the last retry starts, so that it ends in time."""
    return min(15.0, max(2.0, 0.05 * max_wait))


@dataclass(frozen=True, slots=True)
class GreylistPlan:
    """The caller's patience and the server's behaviour, for :func:`greylist_retry_at`."""

    max_wait: float
    #: the longest a triplet can stay greylisted before the greylister forgets it (s)
    window: float
    #: the first back-off step when the server gives no hint (s)
    first_delay: float = 30.0


def greylist_retry_at(now: float, *, first_seen: float, greylisted_since: float, tries: int,
                      hint: float | None, plan: GreylistPlan) -> float | None:
    """The time (same clock as ``now``) to ask a greylisted recipient again, or ``None`` to
    give up now (the verdict is then ``unknown/greylisted`` with a ``retry_after``).

    ``first_seen``: when the recipient was read; ``greylisted_since``: its first greylisting;
    ``tries``: greylist retries already made; ``hint``: seconds the server said to wait."""
    if tries >= MAX_GREYLIST_TRIES:
        return None
    end = min(first_seen + plan.max_wait - deadline_margin(plan.max_wait),
              greylisted_since + plan.window)
    if hint is not None:
        at = now + max(hint, 0.0) + HINT_SLACK
        return at if at <= end else None  # an honest hint: nothing earlier can pass
    at = now + plan.first_delay * float(2 ** tries)
    if at <= end:
        return at
    if end - now >= MIN_GAP:
        return end  # the last retry, just before the wait expires
    return None


@dataclass(frozen=True, slots=True)
class AfterDrop:
    """What a dropped session teaches: the receiver's per-session limit and the size of the
    session that carries the retried recipients."""

    learned_limit: int
    retry_size: int


def after_drop(sent: int, answered: int) -> AfterDrop:
    """A server closed the session after answering ``answered`` of ``sent`` RCPTs: it takes
    ``answered`` per session (or, when it answered none, half); the retry carries at most half."""
    half = max(1, sent // 2)
    learned = answered if answered >= 1 else half
    return AfterDrop(learned, max(1, min(learned, half)))
