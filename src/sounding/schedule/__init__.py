"""The pure scheduler (like Postfix's qmgr): per-receiver queues, concurrency windows,
session gap, unknown-RCPT budget, backoff and feedback, greylist timers, session composition.

Nothing here does I/O or imports asyncio, sockets or the store: tests drive it with clocks.
Its state serialises (``to_dict``/``from_dict``, times relative to "now") so that a fleet can
hand a receiver from one worker to another.
"""

from .domains import DomainBook, DomainState
from .limiter import Feedback, HostLimiter
from .receiver import Decision, GiveUp, ReceiverQueue, Start, Wait, choose_source, decide
from .recipient import ConductStats, Recipient

__all__ = ["ConductStats", "Decision", "DomainBook", "DomainState", "Feedback", "GiveUp", "HostLimiter",
           "ReceiverQueue", "Recipient", "Start", "Wait", "choose_source", "decide"]
