"""Embedded sandbox: a Dodo Payments API simulator and a Segment-compatible collector on loopback."""
