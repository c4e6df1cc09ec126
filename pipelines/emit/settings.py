"""How the emitter reaches Segment and how hard it tries: `EmitSettings`."""

from __future__ import annotations

from dataclasses import dataclass, field

SEGMENT_MAX_BATCH_MESSAGES = 2500
"""Segment drops a batch of more messages silently."""


@dataclass
class EmitSettings:
    """How to reach Segment and how hard to try. Defaults suit production; tests shrink them."""

    write_key: str = field(repr=False)
    host: str = "https://api.segment.io"
    upload_size: int = 2000
    """Messages per batch at most (Segment drops batches over 2,500 silently)."""
    upload_interval: float = 0.05
    """Seconds a consumer waits to fill a batch before sending a partial one. The job enqueues
    a whole send at once (~20,000 messages a second), so 50 ms still fills 2,000-message
    batches; it is also what every send waits after its last message (0.25 s cost a run ~0.4 s
    idle, with the stop of the consumers, which is no longer waited for)."""
    max_queue_size: int = 20_000
    max_retries: int = 6
    """Retries per batch without Retry-After (backoff 0, 0.5, 1, 2, 4, 8 s)."""
    timeout: float = 10.0
    max_backoff_seconds: float = 120.0
    """Cap on the time one batch spends in counted retries."""
    max_rate_limit_seconds: float = 300.0
    """Cap on one 429/Retry-After episode; after it the batch counts as failed."""
    max_events_per_second: float | None = None
    checkpoint_every_messages: int = 10_000
    checkpoint_every_seconds: float = 30.0
    max_consecutive_failed_batches: int = 3
    event_catalog: str = "default"
    """`[events] catalog`: which product events the tracking plan holds."""
    tracking_plan_path: str | None = None
    """`[tracking_plan] path`: validate against this written plan instead of the one the last
    build gives (a plan kept in version control: a change in what is sent is then a reject)."""
    validate: bool = True
    """Check every message against the tracking plan before sending (off: bench comparisons)."""
    alias: bool = False
    """`[identity] alias`: send one alias call (previousId -> userId) when a customer's id changes."""
    excluded_fields: tuple[str, ...] = ()
    """Top-level property/trait keys never sent to Segment (e.g. customer_email, phone)."""
    threads: int = 3
    """Consumer threads of the client (3 measured best on 2 cores: see bench/emit_bench.py)."""
    gzip: bool = True
    """Compress request bodies (the library's fixed level 9): ~6x fewer bytes on the wire for the
    real catalog, for ~20% more CPU per message (off: 10-30% more events/s on 2 busy cores)."""

    def __post_init__(self) -> None:
        if not self.write_key:
            raise ValueError("a Segment write key is required")
        if not 1 <= self.upload_size <= SEGMENT_MAX_BATCH_MESSAGES:
            raise ValueError(f"upload_size must be 1..{SEGMENT_MAX_BATCH_MESSAGES}")
        if self.max_consecutive_failed_batches < 1 or self.threads < 1:
            raise ValueError("max_consecutive_failed_batches and threads must be >= 1")
        self.excluded_fields = tuple(self.excluded_fields)

    def outage_bound_seconds(self) -> float:
        """Upper bound on how long a run keeps trying during a Segment outage."""
        per_batch = max(
            min(self.max_backoff_seconds, 60.0 * self.max_retries) + self.timeout,
            self.max_rate_limit_seconds,
        ) + self.timeout * (self.max_retries + 1)
        return per_batch * self.max_consecutive_failed_batches
