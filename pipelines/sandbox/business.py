"""The sandbox business: API-shaped records of a seeded Dodo merchant, and how they change."""

from __future__ import annotations

import gc
import random
import threading
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.dodo_contract import RESOURCES
from pipelines.sandbox import records as rec
from pipelines.sandbox.billing import cancelled_by, subscription_record
from pipelines.sandbox.bookkeeper import Bookkeeper, Buyer
from pipelines.sandbox.history import History, build_history
from pipelines.sandbox.records import US_PER_DAY, add_interval, iso, parse_iso, to_us
from pipelines.sandbox.tables import Item, Table, Watcher
from pipelines.sandbox.timeflow import advance


class Business:
    """A merchant's API data (lists of API-shaped dicts per resource) and its clock."""

    def __init__(self, history: History, now: datetime, seed: int) -> None:
        self.now = now
        self.seed = seed
        self.lock = threading.RLock()
        self.version = 0
        """Bumped by every mutation; servers key their caches on it."""
        self.tables = {
            name: Table(name, history.rows[name], index=name != "balance_ledger")
            for name in RESOURCES
        }
        self.archived_product_ids = history.archived_product_ids
        self.buyers: dict[str, Buyer] = history.buyers
        self.products_by_name = history.products_by_name
        self._rng = random.Random(seed * 7919 + 1)
        self._balances: dict[str, int] = {}
        for entry in self.balance_ledger:
            self._balances[entry["currency"]] = entry["after_balance"]
        self._journal: list[tuple[str, str]] | None = None
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        # the bookkeeper calls back through a weak reference: no cycle, so a Business no longer
        # referenced is freed at once (its records are frozen out of the cyclic GC's reach)
        me = weakref.proxy(self)
        self._bk = Bookkeeper(self._rng, to_us(now), lambda *row: me._sink(*row))
        self._bk.changing = lambda resource, item: me._changing(resource, item)
        self.identities = history.identities
        """Customers with an app user id in metadata, shared ids, companies (for tests)."""
        self.dunning_attempts: dict[str, int] = dict(history.dunning_attempts)
        """Retries made so far of each past_due subscription's failed renewal."""

    # --- reading ----------------------------------------------------------------------------

    customers = property(lambda self: self.tables["customers"].items)
    products = property(lambda self: self.tables["products"].items)
    subscriptions = property(lambda self: self.tables["subscriptions"].items)
    payments = property(lambda self: self.tables["payments"].items)
    refunds = property(lambda self: self.tables["refunds"].items)
    disputes = property(lambda self: self.tables["disputes"].items)
    balance_ledger = property(lambda self: self.tables["balance_ledger"].items)

    def get(self, resource: str, item_id: str) -> Item:
        """The item of a resource by primary key (KeyError when absent)."""
        item = self.tables[resource].get(item_id)
        if item is None:
            raise KeyError(f"{resource}/{item_id}")
        return item

    def is_archived(self, product_id: str) -> bool:
        """Whether a product is archived (the API exposes this only through the filter)."""
        return product_id in self.archived_product_ids

    def counts(self) -> dict[str, int]:
        """Number of items per resource."""
        return {name: len(table.items) for name, table in self.tables.items()}

    # --- mutation helpers -------------------------------------------------------------------

    def touch(self) -> None:
        """Tell servers that items were edited in place (invalidates their caches)."""
        self.version += 1

    def watch(self, watcher: Watcher) -> None:
        """Tell `watcher` of every later change made through this Business's methods, while it
        lives (held weakly). An item edited by hand (then `touch`) is not seen."""
        with self.lock:
            self._watchers.add(watcher)

    def _changing(self, resource: str, item: Item) -> None:
        for watcher in list(self._watchers):
            watcher.changing(resource, item)

    def _edit(self, resource: str, item_id: str) -> Item:
        """The item about to be edited in place (the watchers told first)."""
        item = self.get(resource, item_id)
        self._changing(resource, item)
        return item

    def _sink(self, resource: str, item: Item, created_us: int) -> None:
        if resource == "balance_ledger":
            before = self._balances.get(item["currency"], 0)
            delta = item["amount"] if item["is_credit"] else -item["amount"]
            item["before_balance"], item["after_balance"] = before, before + delta
            self._balances[item["currency"]] = before + delta
        self.tables[resource].add(item, created_us)
        for watcher in list(self._watchers):
            watcher.created(resource, item)
        if self._journal is not None:
            self._journal.append((resource, item[self.tables[resource].pk]))
        self.version += 1

    def _at(self, at: datetime | None) -> int:
        return to_us(at) if at is not None else to_us(self.now)

    def add_customers(self, n: int = 1, at: datetime | None = None) -> list[Item]:
        """Create `n` customers (created at `at`, default now)."""
        with self.lock:
            out = []
            for _ in range(n):
                created = self._at(at)
                record = rec.customer_record(self._rng, len(self.customers), created)
                country = self._rng.choices(rec.COUNTRIES, rec.COUNTRY_WEIGHTS)[0]
                buyer = Buyer(
                    record, rec.limited_customer(record), country,
                    rec.COUNTRY_CURRENCY[country], None, created,
                )  # fmt: skip
                self.buyers[record["customer_id"]] = buyer
                self._sink("customers", record, created)
                out.append(record)
            return out

    def add_payments(
        self,
        n: int = 1,
        status: str = "succeeded",
        customer_id: str | None = None,
        currency: str | None = None,
        at: datetime | None = None,
    ) -> list[Item]:
        """Create `n` one-time payments (random customers unless given), with ledger rows."""
        with self.lock:
            ids = list(self.buyers)
            out = []
            for _ in range(n):
                buyer = self.buyers[customer_id or self._rng.choice(ids)]
                cur = currency or buyer.currency
                price = rec.convert_usd(self._rng.choice((1900, 4900, 14900)), cur)
                out.append(self._bk.pay(buyer, self._at(at), status, price, cur, extras=False))
            return out

    def add_subscription(
        self, customer_id: str, product_id: str, quantity: int = 1, at: datetime | None = None
    ) -> Item:
        """Start an active subscription with its first (succeeded) payment."""
        with self.lock:
            buyer, created = self.buyers[customer_id], self._at(at)
            sub = subscription_record(
                self._rng, buyer, self.get("products", product_id), created, quantity
            )
            sid, amount = sub["subscription_id"], sub["recurring_pre_tax_amount"]
            nxt = self._next_date(sub, created)
            period = [(sid, created, nxt, "1")]
            self._bk.pay(
                buyer, created, "succeeded", amount, sub["currency"], sid, "new", False, period
            )
            sub["next_billing_date"] = iso(nxt)
            self._sink("subscriptions", sub, created)
            return sub

    def renew_subscription(self, subscription_id: str, at: datetime | None = None) -> Item:
        """Charge the due period (or at `at`, rebasing the dates): a payment, moved billing dates."""
        with self.lock:
            sub = self._edit("subscriptions", subscription_id)
            due = parse_iso(sub["next_billing_date"]) if at is None else to_us(at)
            nxt = self._next_date(sub, due)
            payment = self._bk.pay(
                self.buyers[sub["customer"]["customer_id"]], due, "succeeded",
                sub["recurring_pre_tax_amount"], sub["currency"], subscription_id, "renewal", False,
                [(subscription_id, due, nxt, "1")],
            )  # fmt: skip
            sub["previous_billing_date"] = iso(due)
            sub["next_billing_date"] = iso(nxt)
            self.touch()
            return payment

    def fail_renewal(self, subscription_id: str, at: datetime | None = None) -> Item:
        """The due renewal charge fails: a failed `renewal` payment, the subscription past_due
        (its grace period, API 1.123) with the billing dates left on the unpaid period."""
        with self.lock:
            sub = self._edit("subscriptions", subscription_id)
            payment = self._bk.pay(
                self.buyers[sub["customer"]["customer_id"]], self._at(at), "failed",
                sub["recurring_pre_tax_amount"], sub["currency"], subscription_id, "renewal", False,
            )  # fmt: skip
            self.dunning_attempts[subscription_id] = 0
            self.set_subscription_status(subscription_id, "past_due", at)
            return payment

    def retry_renewal(
        self, subscription_id: str, succeeds: bool, at: datetime | None = None,
        then: str = "on_hold",
    ) -> Item:  # fmt: skip
        """The next dunning retry of a past_due subscription (`retry_attempt` n): success pays the
        period and makes it active again; failure leaves it past_due, or ends the grace period
        with `then` (on_hold or cancelled, by the system: no cancelled_by)."""
        with self.lock:
            sub = self._edit("subscriptions", subscription_id)
            attempt = self.dunning_attempts.get(subscription_id, 0) + 1
            self.dunning_attempts[subscription_id] = attempt
            at_us = self._at(at)
            due = parse_iso(sub["next_billing_date"])
            nxt = self._next_date(sub, due)
            payment = self._bk.pay(
                self.buyers[sub["customer"]["customer_id"]], at_us,
                "succeeded" if succeeds else "failed", sub["recurring_pre_tax_amount"],
                sub["currency"], subscription_id, "renewal", False,
                [(subscription_id, due, nxt, "1")], attempt,
            )  # fmt: skip
            if succeeds:
                sub["previous_billing_date"], sub["next_billing_date"] = iso(due), iso(nxt)
                self.dunning_attempts.pop(subscription_id, None)
                self.set_subscription_status(subscription_id, "active", at)
            elif then in ("on_hold", "cancelled"):
                self.dunning_attempts.pop(subscription_id, None)
                self.set_subscription_status(subscription_id, then, at)
            self.touch()
            return payment

    @staticmethod
    def _next_date(sub: Item, from_us: int) -> int:
        interval, count = sub["payment_frequency_interval"], sub["payment_frequency_count"]
        return add_interval(from_us, interval, count)

    def set_subscription_status(
        self, subscription_id: str, status: str, at: datetime | None = None
    ) -> Item:
        """Set any status (even one outside the spec, e.g. past_due); keeps the dates coherent."""
        with self.lock:
            sub = self._edit("subscriptions", subscription_id)
            stamp = iso(self._at(at))
            sub["status"] = status
            if status == "cancelled":
                sub["cancelled_at"] = sub["cancelled_at"] or stamp
            elif status == "paused":
                sub["paused_at"] = stamp
            elif status == "active":
                sub["paused_at"] = None
            self.touch()
            return sub

    def cancel_subscription(
        self, subscription_id: str, at_period_end: bool = False, at: datetime | None = None
    ) -> Item:
        """Cancel now (status cancelled) or flag cancel_at_next_billing_date."""
        with self.lock:
            sub = self._edit("subscriptions", subscription_id)
            sub["cancelled_by"] = cancelled_by(sub)  # API 1.123: who cancelled or scheduled it
            if at_period_end:
                sub["cancel_at_next_billing_date"] = True
                self.touch()
                return sub
            return self.set_subscription_status(subscription_id, "cancelled", at)

    def change_plan(
        self,
        subscription_id: str,
        product_id: str | None = None,
        quantity: int | None = None,
        at: datetime | None = None,
    ) -> Item:
        """Switch product and/or quantity, re-pricing and charging a prorated plan_change payment."""
        with self.lock:
            sub = self._edit("subscriptions", subscription_id)
            old = sub["recurring_pre_tax_amount"]
            product = self.get("products", product_id or sub["product_id"])
            sub["product_id"], sub["product_name"] = product["product_id"], product["name"]
            sub["quantity"] = quantity or sub["quantity"]
            unit = rec.convert_usd(product["price"], sub["currency"])
            sub["recurring_pre_tax_amount"] = unit * sub["quantity"]
            delta = sub["recurring_pre_tax_amount"] - old
            if delta > 0:  # the rest of the cycle at the new price (proration_factor < 1)
                buyer, at_us = self.buyers[sub["customer"]["customer_id"]], self._at(at)
                start = parse_iso(sub["previous_billing_date"])
                end = parse_iso(sub["next_billing_date"])
                factor = rec.proration(start, at_us, end)
                self._bk.pay(
                    buyer, at_us, "succeeded", max(1, round(delta * float(factor))),
                    sub["currency"], subscription_id, "plan_change", False,
                    [(subscription_id, at_us, max(end, at_us), factor)],
                )  # fmt: skip
            self.touch()
            return sub

    def change_customer_email(self, customer_id: str, email: str) -> Item:
        """Change a customer's email everywhere it is embedded."""
        with self.lock:
            customer, ref = self._edit("customers", customer_id), self.buyers[customer_id].ref
            if self._watchers:  # payments and subscriptions embed the customer's ref
                for resource in ("payments", "subscriptions"):
                    for item in self.tables[resource].items:
                        if item["customer"] is ref:
                            self._changing(resource, item)
            customer["email"] = email
            ref["email"] = email
            self.touch()
            return customer

    def set_payment_status(self, payment_id: str, status: str, at: datetime | None = None) -> Item:
        """Move a payment to a status; succeeding books its ledger rows."""
        with self.lock:
            payment = self._edit("payments", payment_id)
            if status == "succeeded" and payment["status"] != "succeeded":
                at_us, total, cur = self._at(at), payment["total_amount"], payment["currency"]
                self._bk.ledger(at_us, "payment", total, cur, True, payment_id, "Payment received")
                self._bk.ledger(
                    at_us, "payment_fees", rec.fee_of(total), cur, False, payment_id, None
                )
                payment["invoice_id"] = f"inv_{payment_id[4:]}"
                payment["digital_products_delivered"] = True
            payment["status"] = status
            self.touch()
            return payment

    def add_refund(
        self,
        payment_id: str,
        status: str = "pending",
        partial: bool = True,
        at: datetime | None = None,
    ) -> Item:
        """Refund a payment (pending by default)."""
        with self.lock:
            payment = self._edit("payments", payment_id)
            return self._bk.refund(payment, self._at(at), status, partial)

    def set_refund_status(self, refund_id: str, status: str, at: datetime | None = None) -> Item:
        """Move a refund to a status; succeeding books the ledger row and payment.refund_status."""
        with self.lock:
            refund = self._edit("refunds", refund_id)
            if status == "succeeded" and refund["status"] != "succeeded":
                payment = self._edit("payments", refund["payment_id"])
                self._bk.settle_refund(payment, refund, self._at(at))
            refund["status"] = status
            self.touch()
            return refund

    def add_dispute(
        self, payment_id: str, status: str = "dispute_opened", stage: str = "dispute",
        at: datetime | None = None,
    ) -> Item:  # fmt: skip
        """Open a dispute on a payment."""
        with self.lock:
            return self._bk.dispute(self.get("payments", payment_id), self._at(at), status, stage)

    def set_dispute_status(
        self, dispute_id: str, status: str, stage: str | None = None, at: datetime | None = None
    ) -> Item:
        """Move a dispute (and its payment's dispute_status); winning books the reversal."""
        with self.lock:
            dispute = self._edit("disputes", dispute_id)
            payment = self._edit("payments", dispute["payment_id"])
            if status == "dispute_won" and dispute["dispute_status"] != "dispute_won":
                self._bk.win_dispute(payment, dispute, self._at(at))
            dispute["dispute_status"] = payment["dispute_status"] = status
            dispute["dispute_stage"] = stage or dispute["dispute_stage"]
            self.touch()
            return dispute

    def advance_time(
        self, days: float = 3, seed: int | None = None, until: datetime | None = None
    ) -> dict[str, Any]:
        """Let `days` pass (or run until `until`): renewals, churn, settlements, new business.

        The summary maps each kind of change to ids; `created` lists every new id per resource.
        """
        with self.lock:
            end = until if until is not None else self.now + timedelta(days=days)
            start_us, end_us = to_us(self.now), to_us(end)
            if end_us <= start_us:
                return {"from": iso(start_us), "to": iso(start_us)}
            self._bk.now_us = end_us
            self._journal = []
            rng = random.Random(seed if seed is not None else self._rng.random())
            summary = advance(self, end, rng)
            created: dict[str, list[str]] = {}
            for resource, item_id in self._journal:
                created.setdefault(resource, []).append(item_id)
            summary["created"] = created
            self._journal = None
            self.now = end
            self.touch()
            return summary


def generate_business(
    seed: int = 7,
    customers: int = 300,
    start: datetime | None = None,
    now: datetime | None = None,
    payments_target: int | None = None,
    subscriptions: int | None = None,
    older_closed_payments: int = 0,
) -> Business:
    """A seeded business with ~18 months of history up to `now` (default: this second, UTC).

    `older_closed_payments` gives it a deeper past: that many more payments, all closed, before
    those 18 months (the same recent and open objects over more history).
    """
    now = now or datetime.now(UTC).replace(microsecond=0)
    start = start or now - timedelta(days=540)
    subs = customers // 2 if subscriptions is None else subscriptions
    collecting = gc.isenabled()
    gc.disable()  # millions of fresh dicts: cyclic GC passes would dominate the run time
    try:
        history = build_history(
            seed,
            max(customers, 24),
            subs,
            payments_target,
            to_us(start),
            to_us(now),
            older_closed_payments,
        )
        business = Business(history, now, seed)
    finally:
        if collecting:
            gc.enable()
    gc.freeze()  # long-lived records: keep later collections from walking them
    return business


__all__ = ["Business", "Table", "generate_business", "US_PER_DAY"]
