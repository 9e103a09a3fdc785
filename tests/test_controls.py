"""The session's controls decide how far a refusal is believed (pure, bytes in)."""

from __future__ import annotations

from sounding.controls import Controls, judge_acceptance, judge_refusal, kind
from sounding.smtp.reply import Reply, ReplyParser


def r(line: str) -> Reply:
    got = ReplyParser().feed(line.encode() + b"\r\n")
    assert len(got) == 1
    return got[0]


NOUSER = r("550 5.1.1 <x@d.example>: Recipient address rejected: User unknown in local recipient table")
NOUSER_OTHER_TEXT = r("550 5.1.1 <postmaster@d.example>: Recipient address rejected: User unknown")
OK = r("250 2.1.5 Ok")
GREY = r("450 4.2.0 <postmaster@d.example>: Recipient address rejected: Greylisted, see http://postgrey")
POLICY = r("550 5.7.1 <postmaster@d.example>: Recipient address rejected: Access denied")


def test_same_kind_ignores_the_text_and_the_detail_number() -> None:
    assert kind(NOUSER) == kind(NOUSER_OTHER_TEXT)
    assert kind(r("550 5.1.10 RESOLVER.ADR.RecipientNotFound")) == kind(r("550 5.1.1 no such user here"))
    assert kind(NOUSER) != kind(POLICY)


def test_postmaster_accepted_makes_the_refusal_credible() -> None:
    j = judge_refusal(NOUSER, Controls(postmaster=OK, random=NOUSER))
    assert j.credible and j.decided_by.startswith("postmaster accepted, random refused 550 5.1.1")
    assert "credible" in j.decided_by and not j.flags


def test_postmaster_refused_alike_and_nothing_accepted_is_about_us() -> None:
    j = judge_refusal(NOUSER, Controls(postmaster=NOUSER_OTHER_TEXT, random=NOUSER))
    assert not j.credible and "postmaster refused 550 5.1.1 like this address" in j.decided_by


def test_a_server_that_accepts_others_is_credible_and_flagged_without_postmaster() -> None:
    j = judge_refusal(NOUSER, Controls(postmaster=NOUSER_OTHER_TEXT, random=NOUSER, accepted_now=("a@d.example",)))
    assert j.credible and j.flags == {"no_postmaster"} and "lacks postmaster@" in j.decided_by
    earlier = judge_refusal(NOUSER, Controls(postmaster=NOUSER_OTHER_TEXT, accepted_before=3))
    assert earlier.credible and "accepted by this server before" in earlier.decided_by


def test_a_known_good_address_refused_alike_is_about_the_session() -> None:
    """An anti-harvest box that answers 'user unknown' to everyone once it is annoyed."""
    j = judge_refusal(NOUSER, Controls(postmaster=OK, accepted_before=5,
                                       known_good_refused=(("alice@d.example", NOUSER_OTHER_TEXT),)))
    assert not j.credible and j.decided_by.startswith("alice@d.example was accepted before")


def test_postmaster_greylisted_or_refused_otherwise_tells_them_apart() -> None:
    grey = judge_refusal(NOUSER, Controls(postmaster=GREY, random=NOUSER))
    assert grey.credible and "postmaster greylisted" in grey.decided_by and "would take postmaster" in grey.decided_by
    pol = judge_refusal(NOUSER, Controls(postmaster=POLICY))
    assert pol.credible and "refused postmaster otherwise" in pol.decided_by


def test_no_control_is_said() -> None:
    j = judge_refusal(NOUSER, Controls())
    assert j.credible and "no control answered" in j.decided_by


def test_acceptance_evidence_names_the_random_probe() -> None:
    assert judge_acceptance("rejected", NOUSER, OK) == (
        "random refused 550 5.1.1, postmaster accepted → not a catch-all: the acceptance is credible")
    assert judge_acceptance("accepted", OK, OK).startswith("random accepted")
    assert "catch-all unknown" in judge_acceptance("unknown", None, None)


# ------------------------------------------------------------------ retry schedules (pure)
def test_greylist_schedule_fits_inside_max_wait() -> None:
    from sounding.retry import MAX_GREYLIST_TRIES, GreylistPlan, greylist_retry_at

    plan = GreylistPlan(max_wait=150, window=7200, first_delay=30)
    at = greylist_retry_at(0.0, first_seen=0.0, greylisted_since=0.0, tries=0, hint=None, plan=plan)
    assert at == 30.0
    times, now, tries = [], 0.0, 0
    while (nxt := greylist_retry_at(now, first_seen=0.0, greylisted_since=0.0, tries=tries, hint=None,
                                    plan=plan)) is not None:
        times.append(nxt)
        now, tries = nxt, tries + 1
    # 30, 90 (+60), then +120 would pass the wait: a last try at 150 - 7.5
    assert times == [30.0, 90.0, 142.5]
    assert all(t < 150 for t in times) and len(times) <= MAX_GREYLIST_TRIES
    # a hint that fits is followed; one that does not fit ends the wait at once
    assert greylist_retry_at(5.0, first_seen=0.0, greylisted_since=5.0, tries=0, hint=19, plan=plan) == 25.0
    assert greylist_retry_at(5.0, first_seen=0.0, greylisted_since=5.0, tries=0, hint=290, plan=plan) is None
    # the default-sized wait: the postgrey 300 s delay is reached by the back-off
    big = GreylistPlan(max_wait=600, window=7200, first_delay=30)
    seq, now, tries = [], 0.0, 0
    while (nxt := greylist_retry_at(now, first_seen=0.0, greylisted_since=0.0, tries=tries, hint=None,
                                    plan=big)) is not None:
        seq.append(nxt)
        now, tries = nxt, tries + 1
    assert seq == [30.0, 90.0, 210.0, 450.0, 585.0] and any(t >= 300 for t in seq)


def test_after_a_drop_the_retry_carries_half_and_the_limit_is_learned() -> None:
    from sounding.retry import after_drop

    d = after_drop(sent=12, answered=3)
    assert (d.learned_limit, d.retry_size) == (3, 3)
    d = after_drop(sent=4, answered=3)
    assert (d.learned_limit, d.retry_size) == (3, 2)
    d = after_drop(sent=6, answered=0)
    assert (d.learned_limit, d.retry_size) == (3, 3)
    assert after_drop(sent=1, answered=0).retry_size == 1


def test_the_limiter_learns_a_drop_and_grows_back_to_it_never_beyond() -> None:
    from sounding.courtesy.profiles import Profile
    from sounding.schedule import Feedback, HostLimiter

    lim = HostLimiter(Profile("default", 2, 20, 0.0, 8), 60.0, lambda: 0.0)
    assert lim.total_limit == 22
    lim.apply(Feedback("recover", dropped_after=3, retry_size=2))
    assert (lim.total_limit, lim.drop_limit) == (2, 3)  # the retry session: at most half
    lim.apply(Feedback("recover"))
    lim.apply(Feedback("recover"))
    assert lim.total_limit == 3  # back to what the server showed, and no further
    again = HostLimiter.from_dict(lim.to_dict(), Profile("default", 2, 20, 0.0, 8), lambda: 0.0)
    assert (again.total_limit, again.drop_limit) == (3, 3)  # a worker taking over keeps it
