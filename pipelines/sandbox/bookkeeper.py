"""Double-entry-ish bookkeeping of the sandbox: payments with their ledger rows, refunds, disputes."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.sandbox import records as rec
from pipelines.sandbox.records import US_PER_DAY, convert_usd, iso, new_id

Sink = Callable[[str, dict[str, Any], int], None]
"""Receives (resource, item, created_at microseconds) for every new record."""


@dataclass(slots=True)
class Buyer:
    """What the generator knows about a customer beyond the API record."""

    record: dict[str, Any]
    ref: dict[str, Any]
    country: str
    currency: str
    second_currency: str | None
    created_us: int


class Bookkeeper:
    """Creates linked records (payment -> ledger rows, refunds, disputes) and hands them to a sink."""

    def __init__(self, rng: random.Random, now_us: int, sink: Sink) -> None:
        self.rng, self.now_us, self.sink = rng, now_us, sink
        self.changing: Callable[[str, dict[str, Any]], None] = lambda resource, item: None
        """Told before an existing item is edited in place (the Business's watchers)."""
        self.charge_type_since_us = 0
        """Subscription payments created before this have charge_type null (older rows)."""

    def pay(
        self,
        buyer: Buyer,
        created_us: int,
        status: str,
        pre_tax: int,
        currency: str,
        subscription_id: str | list[str] | None = None,
        charge_type: str | None = "new",
        extras: bool = True,
        periods: list[rec.ServicePeriod] | None = None,
        retry_attempt: int = 0,
        usage: int | None = None,
    ) -> dict[str, Any]:
        """A payment with its ledger rows and, at random, a refund or a dispute.

        `subscription_id`: the subscription (or the subscriptions of one checkout) it charges;
        `periods`: the service periods it pays for (kept only if it succeeds); `usage`: metered
        usage billed on top of the plan (pre-tax, `includes_usage`). Subscription payments
        created before `charge_type_since_us` carry no `charge_type`, as rows written before
        the API had the field.
        """
        sids = [subscription_id] if isinstance(subscription_id, str) else subscription_id or []
        if not sids or created_us < self.charge_type_since_us:
            charge_type = None
        billed = pre_tax + (usage or 0)
        tax = rec.tax_of(billed, buyer.country)
        total = billed + tax
        payment = rec.payment_record(
            self.rng, created_us, status, total, currency, buyer.ref, sids, charge_type,
            periods, retry_attempt, usage is not None,
        )  # fmt: skip
        self.sink("payments", payment, created_us)
        if status != "succeeded":
            return payment
        pid = payment["payment_id"]
        self.ledger(created_us, "payment", total, currency, True, pid, "Payment received")
        if not total:  # a zero-amount payment (a card saved for a trial): no tax, no fees
            return payment
        if tax:
            self.ledger(created_us, "tax", tax, currency, False, pid, None)
        self.ledger(created_us, "payment_fees", rec.fee_of(total), currency, False, pid, None)
        self._new_ledger_types(payment, created_us)
        if extras:
            draw = self.rng.random()
            if draw < 0.04:
                delay = self.rng.randrange(3600, 20 * 86400) * 1_000_000
                partial = self.rng.random() < 0.4
                if created_us + delay <= self.now_us:
                    self.refund(payment, created_us + delay, self._refund_status(), partial)
            elif draw < 0.045:
                delay = self.rng.randrange(3 * 86400, 45 * 86400) * 1_000_000
                if created_us + delay <= self.now_us:
                    self.dispute(
                        payment, created_us + delay, *self._dispute_state(created_us + delay)
                    )
        return payment

    def _new_ledger_types(self, payment: dict[str, Any], at_us: int) -> None:
        """Ledger rows of the types API 1.123 added (and the retry fee), chosen by a hash of the
        payment id so the business's random stream stays as it was."""
        pid, currency, total = payment["payment_id"], payment["currency"], payment["total_amount"]
        mark = zlib.crc32(pid.encode()) % 100
        if payment["retry_attempt"]:
            fee = max(1, total // 100)
            self.ledger(at_us, "payment_retry_fee", fee, currency, False, pid, "Dunning retry")
        if payment["card_type"] and mark < 8 and total > 0:
            self.ledger(at_us, "interchange_fee", max(1, total // 150), currency, False, pid, None)
            self.ledger(at_us, "scheme_fee", max(1, total // 800), currency, False, pid, None)
        if mark == 99 and total > 0:  # a rolling reserve, released a month later
            held = total // 10
            self.ledger(at_us, "reserve_hold", held, currency, False, pid, "Rolling reserve")
            if at_us + 30 * US_PER_DAY <= self.now_us:
                release = at_us + 30 * US_PER_DAY
                self.ledger(release, "reserve_release", held, currency, True, pid, None)

    def _refund_status(self) -> str:
        return self.rng.choices(("succeeded", "failed", "pending", "review"), (88, 5, 4, 3))[0]

    def _dispute_state(self, created_us: int) -> tuple[str, str]:
        age_days = (self.now_us - created_us) / US_PER_DAY
        if age_days < 10:
            return "dispute_opened", self.rng.choice(("pre_dispute", "dispute"))
        if age_days < 25:
            return "dispute_challenged", "dispute"
        status = self.rng.choice(
            (
                "dispute_won",
                "dispute_lost",
                "dispute_accepted",
                "dispute_expired",
                "dispute_cancelled",
            )
        )
        return status, "pre_arbitration" if self.rng.random() < 0.1 else "dispute"

    def refund(
        self, payment: dict[str, Any], created_us: int, status: str, partial: bool
    ) -> dict[str, Any]:
        """A refund of a payment (partial: 20-70% of it), with its ledger row once succeeded."""
        total = payment["total_amount"]
        amount = max(1, int(total * self.rng.uniform(0.2, 0.7))) if partial else total
        refund = {
            "refund_id": new_id(self.rng, "ref_"),
            "payment_id": payment["payment_id"],
            "business_id": rec.BUSINESS_ID,
            "created_at": iso(created_us),
            "status": status,
            "is_partial": partial,
            "amount": amount,
            "currency": payment["currency"],
            "reason": self.rng.choice(rec.REFUND_REASONS),
            # API 1.123: the network's reference, once the network gave one
            "network_reference": None,
            "network_reference_type": None,
            "network_reference_updated_at": None,
        }
        if status == "succeeded" and zlib.crc32(refund["refund_id"].encode()) % 2:
            refund["network_reference"] = f"7{zlib.crc32(refund['refund_id'].encode()):022d}"
            refund["network_reference_type"] = "acquirer_reference_number"
            refund["network_reference_updated_at"] = iso(created_us + 2 * US_PER_DAY)
        self.sink("refunds", refund, created_us)
        if status == "succeeded":
            self.settle_refund(payment, refund, created_us)
        return refund

    def settle_refund(self, payment: dict[str, Any], refund: dict[str, Any], at_us: int) -> None:
        """Book a succeeded refund: the payment's refund_status and a ledger debit."""
        self.changing("payments", payment)
        if payment.get("refund_status") != "full":
            payment["refund_status"] = "partial" if refund["is_partial"] else "full"
        self.ledger(
            at_us, "refund", refund["amount"], refund["currency"], False, refund["refund_id"], None
        )

    def dispute(
        self, payment: dict[str, Any], created_us: int, status: str, stage: str
    ) -> dict[str, Any]:
        """A dispute on a payment (amount is a string of minor units), with its ledger rows."""
        dispute = {
            "dispute_id": new_id(self.rng, "dp_"),
            "payment_id": payment["payment_id"],
            "business_id": rec.BUSINESS_ID,
            "created_at": iso(created_us),
            "amount": str(payment["total_amount"]),
            "currency": payment["currency"],
            "dispute_stage": stage,
            "dispute_status": status,
            "payment_provider": "dodo",
            "is_resolved_by_rdr": False,
        }
        self.sink("disputes", dispute, created_us)
        self.changing("payments", payment)
        payment["dispute_status"] = status
        currency, did = payment["currency"], dispute["dispute_id"]
        self.ledger(created_us, "dispute", payment["total_amount"], currency, False, did, None)
        fee = convert_usd(1500, currency)
        self.ledger(created_us, "dispute_fees", fee, currency, False, did, "Chargeback fee")
        if status == "dispute_won":
            self.win_dispute(payment, dispute, created_us + 20 * US_PER_DAY)
        return dispute

    def win_dispute(self, payment: dict[str, Any], dispute: dict[str, Any], at_us: int) -> None:
        """Book a won dispute: the disputed amount comes back."""
        amount = int(dispute["amount"])
        did = dispute["dispute_id"]
        self.ledger(at_us, "dispute_reversal", amount, dispute["currency"], True, did, None)

    def ledger(
        self,
        at_us: int,
        event_type: str,
        amount: int,
        currency: str,
        is_credit: bool,
        reference: str | None,
        description: str | None,
    ) -> None:
        """Append one balance ledger entry."""
        entry = rec.ledger_record(
            self.rng, at_us, event_type, amount, currency, is_credit, reference, description
        )
        self.sink("balance_ledger", entry, at_us)
