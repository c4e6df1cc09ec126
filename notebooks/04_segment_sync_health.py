# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Segment sync health
#
# What each run sent to Segment, what is waiting, what was refused, and, for one customer, what
# Segment knows: the traits of their last identify and their last events. How fresh the data in
# Segment is: the delay from each event's time to Segment's acknowledgement, by the path that
# carried it (a scheduled run or a run triggered by `dodo-segment listen`), and how long each
# step of each run took.
#
# Sources: `segment_sync.runs` (one row per `dodo-segment run`), the delivery ledger
# `segment_sync.delivered_events` (`delivered`, or `skipped` for the history backlog of the first
# sync), `segment_sync.identify_state` (hash of the traits Segment last received),
# `segment_sync.rejected_messages`, `analytics.quarantined_rows`, `segment_sync.run_steps`
# (seconds per step of each run), and the outboxes. The queries shared with
# `dodo-segment report` live in `pipelines/analysis/queries.py` (printed below where used).
# Every SQL query below runs as is in the DuckDB CLI: `duckdb -readonly dodo_segment.duckdb`
# (for the per-customer queries, first `SET VARIABLE customer_id = 'cus_...';`).

# %% tags=["parameters"]
RUNS = 20  # how many recent runs to show
CUSTOMER_ID = None  # a Dodo customer_id; None = the customer with the most delivered events
LAST_EVENTS = 10

# %%
import json

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from pipelines import analysis

analysis.use_style()
wh = analysis.open_warehouse()

# %% [markdown]
# ## Runs

# %%
RECENT_RUNS = analysis.queries.RECENT_RUNS  # with the path: scheduled run or webhook-triggered
runs = analysis.queries.recent_runs(wh, limit=RUNS)
display(runs)

# %%
fig, (sent, waiting) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2, 1]})
labels = [f"{t:%m-%d %H:%M:%S}" for t in runs["started_at"]]
x = range(len(runs))
sent.bar([i - 0.2 for i in x], runs["identifies_sent"].fillna(0), width=0.4, color="#4c78a8", label="identify")
sent.bar([i + 0.2 for i in x], runs["tracks_sent"].fillna(0), width=0.4, color="#54a24b", label="track")
for i, outcome in enumerate(runs["outcome"]):
    if outcome not in ("success", "running"):
        sent.annotate(outcome, (i, 0), rotation=90, ha="center", va="bottom", fontsize=8, color="#c0392b")
sent.set_xticks(list(x), labels, rotation=45, ha="right")
sent.set_title("Messages delivered to Segment per run")
sent.set_xlabel("run start (UTC)")
sent.set_ylabel("messages")
sent.legend()
waiting.plot(x, runs["pending"], "o-", color="#f58518", label="pending after the run")
waiting.plot(x, runs["rejected"].fillna(0), "o-", color="#e45756", label="rejected in the run")
waiting.plot(x, runs["quarantined"].fillna(0), "o-", color="#b279a2", label="quarantined (data tests)")
waiting.set_xticks(list(x), labels, rotation=45, ha="right")
waiting.set_title("Left behind per run")
waiting.set_xlabel("run start (UTC)")
waiting.set_ylabel("messages / rows")
waiting.set_ylim(0, max(5, runs[["pending", "rejected", "quarantined"]].max().max() * 1.2))
waiting.legend(fontsize=9)
analysis.finish_figure(fig, wh, "sync_runs")
plt.show()

# %% [markdown]
# ## The ledger: what each run recorded
# `skipped` = history backlog recorded on the first sync and never sent (Segment may already have
# those events from the webhook integration; `dodo-segment run --events-since DATE` sends them).

# %%
LEDGER_BY_RUN = """
select run_id, status, count(*) as events, min(delivered_at) as first_at, max(delivered_at) as last_at
from segment_sync.delivered_events
group by all
order by first_at, status
"""
ledger = wh.query(LEDGER_BY_RUN)
display(ledger)

# %% [markdown]
# ## Pending now, rejected, quarantined
# Pending tracks: in the outbox, not in the ledger, not rejected. Pending identifies: customers
# whose traits, as the emitter would send them (nulls and `excluded_fields` removed), differ from
# what Segment last received; that test is the emitter's own (`analysis.pending_identifies`), as
# `identify_state` keeps a hash of the traits as sent.

# %%
PENDING = analysis.queries.PENDING
pending = analysis.queries.pending(wh)
identify_pending = analysis.pending_identifies(wh)
pending["pending_identifies"] = len(identify_pending)
display(pd.Series(pending, name="now"))

REJECTED = analysis.queries.REJECTED
QUARANTINED = """
select test_name, key_kind, count(*) as rows_held_back
from analytics.quarantined_rows
group by all
order by rows_held_back desc
"""
display(wh.query(REJECTED))
display(wh.query(QUARANTINED))

# %% [markdown]
# ## Delivery delay: from an event to Segment's acknowledgement
# Seconds from an event's time (`lifecycle_events.occurred_at`) to Segment's acknowledgement of
# the batch that carried it (`delivered_events.delivered_at`), by the path of the run:
# **scheduled run** (read the API: cron, systemd or by hand), **webhook-triggered** (read no API,
# merged the deliveries `dodo-segment listen` stored), and the **first sync**, whose events are
# the history it was asked to send (their delay is the age of that history). In the sandbox the
# webhook run's business clock runs hours ahead of the wall clock, so its delays can be negative.

# %%
print(analysis.queries.DELIVERY_DELAY_BY_PATH)
delay_by_path = analysis.queries.delivery_delay_by_path(wh)
delay_by_run = analysis.queries.delivery_delay_by_run(wh)
display(delay_by_path)
if len(delay_by_run):
    fig, ax = plt.subplots()
    analysis.charts.draw_delivery_delay(ax, delay_by_run)
    analysis.finish_figure(fig, wh, "delivery_delay")
    plt.show()

# %% [markdown]
# ## Each run's duration, by step
# `segment_sync.run_steps`: seconds in extract (API -> dodo_raw, with webhook merges), models
# (SQL and data tests) and emit (Segment), per run, oldest first.

# %%
steps = analysis.queries.run_steps(wh)
if len(steps):
    step_table = steps.pivot_table(index=["started_at", "path"], columns="step", values="seconds")
    display(step_table.tail(RUNS).round(2))
    fig, ax = plt.subplots()
    analysis.charts.draw_run_steps(ax, steps[steps["run_id"].isin(runs["run_id"])])
    analysis.finish_figure(fig, wh, "run_steps")
    plt.show()

# %% [markdown]
# ## What does Segment know about customer X?
# - **Traits**: the customer's identify traits now (`identify_outbox`), and whether Segment has
#   them: when the customer is not among the pending identifies above, Segment received exactly
#   these traits. Fields listed in `[segment] excluded_fields` are removed when sending.
# - **Events**: their last events in the delivery ledger, with the state of each.

# %%
DEFAULT_CUSTOMER = """
select l.customer_id
from segment_sync.delivered_events as d
inner join analytics.lifecycle_events as l using (event_id)
where d.status = 'delivered' and l.customer_id is not null
group by l.customer_id
order by count(*) desc, l.customer_id
limit 1
"""
customer_id = CUSTOMER_ID or wh.scalar(DEFAULT_CUSTOMER)
if customer_id is None:  # nothing delivered yet: take any identified customer
    customer_id = wh.scalar("select min(user_id) from segment_sync.identify_state")
print(f"Customer: {customer_id}")

CUSTOMER_TRAITS = """
select
    o.user_id,
    o.traits,
    s.sent_at as identify_sent_at,
    s.run_id as identify_run_id
from analytics.identify_outbox as o
left join segment_sync.identify_state as s using (user_id)
where o.user_id = getvariable('customer_id')
"""
identity = wh.query(CUSTOMER_TRAITS, {"customer_id": customer_id})
traits = json.loads(identity.iloc[0]["traits"]) if len(identity) else {}
if len(identity):
    row = identity.iloc[0]
    print(
        f"Identify last sent {row['identify_sent_at']} (run {row['identify_run_id']}); "
        + ("traits changed since: the next run sends an identify." if customer_id in identify_pending
           else "Segment has the current traits.")
    )
else:
    print("Not in identify_outbox: unknown customer (or quarantined).")
display(pd.Series(traits, name="trait", dtype=object).to_frame("value"))

CUSTOMER_EVENTS = """
select
    l.occurred_at,
    l.event,
    l.object_id,
    coalesce(d.status, case when r.message_id is not null then 'rejected' else 'pending' end)
        as segment_state,
    d.delivered_at,
    l.properties
from analytics.lifecycle_events as l
left join segment_sync.delivered_events as d using (event_id)
left join segment_sync.rejected_messages as r on r.kind = 'track' and r.message_id = l.event_id
where l.customer_id = getvariable('customer_id')
order by l.occurred_at desc, l.event_id
"""
events = wh.query(CUSTOMER_EVENTS, {"customer_id": customer_id})
print(events["segment_state"].value_counts().to_string())
display(events.head(LAST_EVENTS))

# %% [markdown]
# ## Key figures
# One JSON line, read by `tests/test_notebooks.py` to check this notebook against the ledger.

# %%
latest = runs.iloc[-1] if len(runs) else None
analysis.publish(
    {
        "runs": len(runs),
        "latest_run": None if latest is None else {
            "run_id": latest["run_id"],
            "outcome": latest["outcome"],
            "identifies_sent": latest["identifies_sent"],
            "tracks_sent": latest["tracks_sent"],
            "pending": latest["pending"],
        },
        "identifies_sent_total": runs["identifies_sent"].fillna(0).sum(),
        "tracks_sent_total": runs["tracks_sent"].fillna(0).sum(),
        **{k: int(v) for k, v in pending.items()},
        "customer_id": customer_id,
        "customer_traits": traits,
        "customer_events_by_state": events["segment_state"].value_counts().to_dict(),
        "customer_last_events": events["event"].head(LAST_EVENTS).tolist(),
        "delay_by_path": {r.path: {"runs": r.runs, "events": r.events, "median_seconds": r.median_seconds}
                          for r in delay_by_path.itertuples()},
        "runs_by_path": runs["path"].value_counts().to_dict(),
        "step_runs": steps["run_id"].nunique(),
        "is_demo": wh.is_demo,
    }
)
