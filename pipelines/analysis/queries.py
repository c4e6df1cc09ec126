"""The queries behind the notebooks and `dodo-segment report` (MRR, revenue, sync health; dunning
in `dunning.py`): one copy of each, plain DuckDB SQL.

Every constant runs as is in the DuckDB CLI (`duckdb -readonly dodo_segment.duckdb`); the
functions run them through a read-only `Warehouse` and shape the result for a table or a chart.
A function whose tables do not exist yet (a warehouse older than the feature) returns an empty
frame, never an error.
"""

from __future__ import annotations

import pandas as pd

from pipelines.analysis.reader import Warehouse

# --- MRR and revenue ------------------------------------------------------------------------

MRR_BY_MONTH = """
select
    month,
    round(sum(mrr_usd), 2) as mrr_usd,
    count(*) filter (where mrr_usd > 0) as paying_customers
from analytics.mrr_monthly
group by month
order by month
"""

MRR_MOVEMENTS = """
select
    month,
    movement,
    count(*) as customers,
    round(sum(mrr_change_usd), 2) as mrr_change_usd
from analytics.mrr_monthly
where movement <> 'unchanged'
group by all
order by month, movement
"""

CUSTOMERS_GAINED_AND_CHURNED = """
select
    month,
    count(*) filter (where movement = 'new') as new_customers,
    count(*) filter (where movement = 'reactivation') as reactivated_customers,
    count(*) filter (where movement = 'churn') as churned_customers
from analytics.mrr_monthly
group by month
order by month
"""

# payments_without_usd: succeeded payments the ledger has no USD value for (yet): when that
# column is not 0, the month's USD total is a lower bound.
REVENUE_USD_BY_MONTH = """
with ledger_coverage as (
    select
        cast(date_trunc('month', timezone('UTC', p.created_at)) as date) as month,
        count(*) filter (where l.payment_usd_cents is null) as payments_without_usd
    from analytics.stg_payments as p
    left join analytics.int_ledger_by_object as l on l.object_id = p.payment_id
    where p.status = 'succeeded'
    group by all
),

monthly as (
    select
        cast(date_trunc('month', date) as date) as month,
        round(sum(gross_usd), 2) as gross_usd,
        round(sum(refunds_usd), 2) as refunds_usd,
        round(sum(net_usd), 2) as net_usd,
        sum(payments) as payments
    from analytics.revenue_daily
    group by all
)

select monthly.*, coalesce(ledger_coverage.payments_without_usd, 0) as payments_without_usd
from monthly
left join ledger_coverage using (month)
order by month
"""

# --- sync health -------------------------------------------------------------------------

# How a run was started, from what it recorded: a run that read the API is a scheduled run
# (`dodo-segment run` from cron or by hand); one that read no API but merged webhook deliveries
# was triggered by `dodo-segment listen`.
RUN_PATH = """
case
    when coalesce(cast(api_requests as varchar), '{}') not in ('{}', 'null') then 'scheduled run'
    when contains(coalesce(cast(rows_loaded as varchar), ''), '"webhook:') then 'webhook-triggered'
    else 'other'
end
"""

RECENT_RUNS = f"""
select
    run_id,
    command,
    {RUN_PATH} as path,
    started_at,
    round(duration_seconds, 1) as seconds,
    outcome,
    exit_code,
    identifies_sent,
    tracks_sent,
    skipped_backlog,
    rejected,
    quarantined,
    pending,
    error
from segment_sync.runs
order by started_at desc
"""

PENDING = """
select
    (select count(*) from analytics.track_outbox as o
     where not exists (select 1 from segment_sync.delivered_events as d where d.event_id = o.event_id)
       and not exists (select 1 from segment_sync.rejected_messages as r
                       where r.kind = 'track' and r.message_id = o.event_id)) as pending_tracks,
    (select count(*) from segment_sync.rejected_messages) as rejected_total,
    (select count(*) from analytics.quarantined_rows) as quarantined_now,
    (select count(*) from segment_sync.delivered_events where status = 'delivered') as delivered_total,
    (select count(*) from segment_sync.delivered_events where status = 'skipped') as skipped_total,
    (select count(*) from segment_sync.identify_state) as customers_identified
"""

REJECTED = """
select kind, reason, count(*) as messages, max(rejected_at) as last_rejected_at
from segment_sync.rejected_messages
group by all
order by messages desc
"""

# Seconds from an event's time (lifecycle_events.occurred_at) to Segment's acknowledgement
# (delivered_events.delivered_at), with the path of the run that carried it. The earliest run
# that delivered anything is the first sync: its events are the history it was asked to send, so
# their delays say how old that history is, not how fresh the data is.
DELIVERED_WITH_DELAY = f"""
with runs as (
    select run_id, started_at, {RUN_PATH} as path from segment_sync.runs
),

first_sync as (
    select min(run_id) as run_id from segment_sync.delivered_events where status = 'delivered'
),

delivered as (
    select
        delivered_events.run_id,
        runs.started_at,
        case when delivered_events.run_id = first_sync.run_id then 'first sync (history)'
             else runs.path end as path,
        epoch(delivered_events.delivered_at) - epoch(lifecycle_events.occurred_at) as delay_seconds
    from segment_sync.delivered_events
    inner join analytics.lifecycle_events using (event_id)
    inner join runs using (run_id)
    cross join first_sync
    where delivered_events.status = 'delivered'
)
"""

DELAY_FIGURES = """
    count(*) as events,
    round(median(delay_seconds), 1) as median_seconds,
    round(quantile_cont(delay_seconds, 0.9), 1) as p90_seconds,
    round(max(delay_seconds), 1) as max_seconds
"""

DELIVERY_DELAY_BY_RUN = f"""{DELIVERED_WITH_DELAY}
select run_id, started_at, path, {DELAY_FIGURES}
from delivered
group by all
order by started_at
"""

DELIVERY_DELAY_BY_PATH = f"""{DELIVERED_WITH_DELAY}
select path, count(distinct run_id) as runs, {DELAY_FIGURES}
from delivered
group by all
order by path
"""

RUN_STEPS = f"""
select runs.run_id, runs.started_at, {RUN_PATH} as path, run_steps.step, run_steps.seconds
from segment_sync.run_steps
inner join segment_sync.runs as runs using (run_id)
order by runs.started_at, run_steps.step
"""


def as_months(frame: pd.DataFrame, column: str = "month") -> pd.DataFrame:
    """The `month` column as pandas datetimes (DuckDB returns dates)."""
    if column in frame:
        frame[column] = pd.to_datetime(frame[column])
    return frame


def mrr_by_month(wh: Warehouse) -> pd.DataFrame:
    """MRR (USD) and paying customers per month, the last month measured at as_of."""
    return as_months(wh.query(MRR_BY_MONTH))


def mrr_movements(wh: Warehouse) -> pd.DataFrame:
    """Customers and USD of each MRR movement (new, expansion, ...) per month."""
    return as_months(wh.query(MRR_MOVEMENTS))


def customers_gained_and_churned(wh: Warehouse) -> pd.DataFrame:
    """New, reactivated and churned customers per month (from the MRR movements)."""
    return as_months(wh.query(CUSTOMERS_GAINED_AND_CHURNED))


def revenue_usd_by_month(wh: Warehouse) -> pd.DataFrame:
    """Gross, refunds and net revenue in USD per month, with the payments the ledger lacks."""
    return as_months(wh.query(REVENUE_USD_BY_MONTH))


def recent_runs(wh: Warehouse, limit: int | None = None) -> pd.DataFrame:
    """The runs, oldest first (the last `limit` when given), with the path that started each."""
    if not wh.has_table("segment_sync", "runs"):
        return pd.DataFrame()
    runs = wh.query(RECENT_RUNS)
    return (runs.head(limit) if limit else runs).iloc[::-1].reset_index(drop=True)


def sync_is_set_up(wh: Warehouse) -> bool:
    """Whether the emitter has written its ledger (a first sync has run)."""
    return wh.has_table("segment_sync", "delivered_events")


def pending(wh: Warehouse) -> dict[str, int]:
    """Tracks pending, rejected, quarantined, delivered, skipped and customers identified now."""
    return {k: int(v) for k, v in wh.query(PENDING).iloc[0].to_dict().items()}


def rejected(wh: Warehouse) -> pd.DataFrame:
    """Rejected messages by kind and reason."""
    return wh.query(REJECTED)


def delivery_delay_by_run(wh: Warehouse) -> pd.DataFrame:
    """Event-to-acknowledgement delay per delivering run (median, p90, max), with its path."""
    if not sync_is_set_up(wh) or not wh.has_table("segment_sync", "runs"):
        return pd.DataFrame()
    return wh.query(DELIVERY_DELAY_BY_RUN)


def delivery_delay_by_path(wh: Warehouse) -> pd.DataFrame:
    """Per path (first sync, scheduled run, webhook-triggered): runs, events, delay quantiles."""
    if not sync_is_set_up(wh) or not wh.has_table("segment_sync", "runs"):
        return pd.DataFrame()
    return wh.query(DELIVERY_DELAY_BY_PATH)


def run_steps(wh: Warehouse) -> pd.DataFrame:
    """Seconds per step (extract, models, emit, total) of each run whose steps are kept (the
    newest 288: `bookkeeping.py` folds older ones into `pruned_steps`), oldest first."""
    if not wh.has_table("segment_sync", "run_steps"):
        return pd.DataFrame(columns=["run_id", "started_at", "path", "step", "seconds"])
    return wh.query(RUN_STEPS)
