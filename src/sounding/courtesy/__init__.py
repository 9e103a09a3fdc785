"""Courtesy: per-receiver limits, the source IP pool and its reputation, DNSBL self-checks,
opt-outs, canaries. Pure state machines with injected clocks; the engine does the I/O."""
