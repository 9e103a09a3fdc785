"""One exception tree for "could not run".

Expected negative answers (a 550, a block, a timeout of one server) are *data* in a
:class:`~sounding.verdict.Verdict`, never exceptions. Exceptions are for the cases where
Sounding itself cannot do its job: bad configuration, bad input files, a sandbox that
cannot bind its addresses.

::

    SoundingError
    ├── ConfigError            bad settings, world file or command-line values
    ├── InputError             an input list that cannot be read at all
    ├── SandboxError           the simulated mail world could not start
    ├── StoreError             the database cannot be opened or migrated
    ├── VerifierBusy           a second verify_many run on one verifier
    ├── AddressError           an address that cannot be parsed (carries the reason)
    └── TransportError         network failures, translated at the boundary
        ├── DNSFailure         SERVFAIL, timeout, no nameserver answered
        └── SMTPTransportError connect refused/timed out, connection lost, TLS failure
            ├── ConnectFailed
            ├── PhaseTimeout
            └── ConnectionLost
"""

from __future__ import annotations


class SoundingError(Exception):
    """Root of every error Sounding raises on purpose."""


class ConfigError(SoundingError):
    """Invalid settings, world description or command-line value."""


class InputError(SoundingError):
    """An input file that cannot be read at all (a bad *row* is data, not an error)."""


class StoreError(SoundingError):
    """The database cannot be opened, migrated or written."""


class VerifierBusy(SoundingError):
    """A second ``verify_many`` run on a verifier that is running one (one run at a time:
    the receivers' limits are the run's)."""


class SandboxError(SoundingError):
    """The sandbox mail world could not be built or started."""


class AddressError(SoundingError):
    """An address that is not a syntactically valid, safe e-mail address."""

    def __init__(self, message: str, *, code: str = "syntax") -> None:
        super().__init__(message)
        self.code = code


class TransportError(SoundingError):
    """A network operation failed; raised by the I/O shell only."""


class DNSFailure(TransportError):
    """DNS gave no usable answer (SERVFAIL, timeout, refused): never evidence of absence."""


class SMTPTransportError(TransportError):
    """An SMTP connection could not be made or was lost."""


class ConnectFailed(SMTPTransportError):
    """TCP connect refused, unreachable or timed out."""


class PhaseTimeout(SMTPTransportError):
    """A per-phase timeout (greeting, command) or the whole-session deadline expired."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"timeout during {phase}")
        self.phase = phase


class ConnectionLost(SMTPTransportError):
    """The server closed the connection or sent something unusable."""
