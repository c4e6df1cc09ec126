-- grain: customer
-- One row per lifecycle event (see docs/models.md for the catalog).
-- event_id   md5(fact_kind || ':' || immutable keys): independent of the event name, so it is
--            the same across rebuilds and across event catalogs (Segment messageId, 32 chars).
-- event      name in the catalog chosen by getvariable('event_catalog'): 'default' or
--            'ecommerce' (Payment Completed -> Order Completed, Payment Refunded -> Order
--            Refunded).
-- customer_id  Segment userId; the refunded/disputed payment's customer for refunds/disputes.
--            NULL or unknown customers are kept here and quarantined by a warn data test.
-- occurred_at  TIMESTAMPTZ of the fact; properties JSON without null values, amounts as JSON
--            numbers in major units rounded to the currency exponent, dates as ISO-8601 UTC.
-- fact_kind, object_id  what the event is about (payment_id, subscription_id, ...).
with payments as (
    select * from analytics.stg_payments
),

payment_subscriptions as (
    select * from analytics.stg_payment_subscriptions
),

refunds as (
    select * from analytics.stg_refunds
),

disputes as (
    select * from analytics.stg_disputes
),

subscriptions as (
    select * from analytics.int_subscriptions
),

subscription_transitions as (
    select * from analytics.int_subscription_transitions
),

dispute_transitions as (
    select * from analytics.int_dispute_transitions
),

as_of as (
    select as_of from analytics.int_as_of
),

catalog as (
    select coalesce(getvariable('event_catalog'), 'default') = 'ecommerce' as is_ecommerce
),

payment_completed as (
    select
        'payment_completed' as fact_kind,
        payments.payment_id as fact_key,
        case when catalog.is_ecommerce then 'Order Completed' else 'Payment Completed' end
            as event,
        payments.customer_id,
        payments.created_at as occurred_at,
        case
            when catalog.is_ecommerce then json_object(
                'order_id', payments.payment_id,
                'total', payments.amount,
                'revenue', payments.amount,
                'currency', payments.currency,
                'products', case
                    when subscriptions.subscription_id is not null then json_array(json_object(
                        'product_id', subscriptions.product_id,
                        'quantity', subscriptions.quantity
                    ))
                end
            )
            else json_object(
                'payment_id', payments.payment_id,
                'amount', payments.amount,
                'revenue', payments.amount,
                'currency', payments.currency,
                'payment_method', payments.payment_method,
                'subscription_id', payments.subscription_id,
                'customer_email', payments.customer_email,
                'customer_name', payments.customer_name,
                'charge_type', payments.charge_type,
                'retry_attempt', payments.retry_attempt
            )
        end as properties,
        payments.payment_id as object_id
    from payments
    cross join catalog
    left join subscriptions
        on subscriptions.subscription_id = payments.subscription_id
    where payments.status = 'succeeded'
),

payment_failed as (
    select
        'payment_failed' as fact_kind,
        payment_id as fact_key,
        'Payment Failed' as event,
        customer_id,
        created_at as occurred_at,
        json_object(
            'payment_id', payment_id,
            'amount', amount,
            'currency', currency,
            'payment_method', payment_method,
            'subscription_id', subscription_id,
            'charge_type', charge_type,
            'retry_attempt', retry_attempt
        ) as properties,
        payment_id as object_id
    from payments
    where status = 'failed'
),

-- a dunning retry that succeeded (API 1.123 retry_attempt >= 1): needs no earlier sync
payment_recovered as (
    select
        'payment_recovered' as fact_kind,
        payment_id as fact_key,
        'Payment Recovered' as event,
        customer_id,
        created_at as occurred_at,
        json_object(
            'payment_id', payment_id,
            'subscription_id', coalesce(subscription_id, subscription_ids[1]),
            'amount', amount,
            'currency', currency,
            'retry_attempt', retry_attempt
        ) as properties,
        payment_id as object_id
    from payments
    where status = 'succeeded' and retry_attempt >= 1
),

payment_refunded as (
    select
        'refund_succeeded' as fact_kind,
        refunds.refund_id as fact_key,
        case when catalog.is_ecommerce then 'Order Refunded' else 'Payment Refunded' end
            as event,
        payments.customer_id,
        refunds.created_at as occurred_at,
        case
            when catalog.is_ecommerce then json_object(
                'order_id', refunds.payment_id,
                'total', analytics.to_major(refund_amounts.amount_minor, refund_amounts.currency),
                'currency', refund_amounts.currency
            )
            else json_object(
                'refund_id', refunds.refund_id,
                'payment_id', refunds.payment_id,
                'amount', analytics.to_major(refund_amounts.amount_minor, refund_amounts.currency),
                'currency', refund_amounts.currency,
                'reason', refunds.reason,
                'is_partial', refunds.is_partial
            )
        end as properties,
        refunds.refund_id as object_id
    from refunds
    cross join catalog
    left join payments
        on payments.payment_id = refunds.payment_id
    cross join lateral (
        select
            -- a full refund without an amount refunds the whole payment
            coalesce(
                refunds.amount_minor,
                case when not refunds.is_partial then payments.amount_minor end
            ) as amount_minor,
            coalesce(refunds.currency, payments.currency) as currency
    ) as refund_amounts
    where refunds.status = 'succeeded'
),

dispute_opened as (
    select
        'dispute_opened' as fact_kind,
        disputes.dispute_id as fact_key,
        'Dispute Opened' as event,
        payments.customer_id,
        disputes.created_at as occurred_at,
        json_object(
            'dispute_id', disputes.dispute_id,
            'payment_id', disputes.payment_id,
            'amount', disputes.amount,
            'currency', disputes.currency,
            'dispute_stage', disputes.dispute_stage,
            'dispute_status', disputes.dispute_status
        ) as properties,
        disputes.dispute_id as object_id
    from disputes
    left join payments
        on payments.payment_id = disputes.payment_id
),

dispute_resolved as (
    select
        dispute_transitions.fact_kind,
        dispute_transitions.fact_key,
        case dispute_transitions.fact_kind
            when 'dispute_won' then 'Dispute Won'
            when 'dispute_lost' then 'Dispute Lost'
        end as event,
        payments.customer_id,
        dispute_transitions.occurred_at,
        json_object(
            'dispute_id', dispute_transitions.dispute_id,
            'payment_id', disputes.payment_id,
            'amount', disputes.amount,
            'currency', disputes.currency,
            'dispute_stage', dispute_transitions.dispute_stage,
            'previous_status', dispute_transitions.previous_status,
            'status', dispute_transitions.status
        ) as properties,
        dispute_transitions.dispute_id as object_id
    from dispute_transitions
    left join disputes
        on disputes.dispute_id = dispute_transitions.dispute_id
    left join payments
        on payments.payment_id = disputes.payment_id
),

subscription_started as (
    select
        'subscription_started' as fact_kind,
        subscription_id as fact_key,
        'Subscription Started' as event,
        customer_id,
        created_at as occurred_at,
        json_object(
            'subscription_id', subscription_id,
            'product_id', product_id,
            'amount', recurring_amount,
            'currency', currency,
            'frequency', payment_frequency_interval,
            'frequency_count', payment_frequency_count,
            'quantity', quantity,
            'next_billing', analytics.iso_utc(next_billing_date),
            'customer_email', customer_email
        ) as properties,
        subscription_id as object_id
    from subscriptions
    where has_started
),

subscription_cancelled as (
    select
        'subscription_cancelled' as fact_kind,
        subscription_id as fact_key,
        'Subscription Cancelled' as event,
        customer_id,
        cancelled_at as occurred_at,
        json_object(
            'subscription_id', subscription_id,
            'product_id', product_id,
            'cancelled_at', analytics.iso_utc(cancelled_at),
            'cancel_at_next_billing', cancel_at_next_billing_date,
            'customer_email', customer_email,
            'cancelled_by', cancelled_by_actor
        ) as properties,
        subscription_id as object_id
    from subscriptions
    where cancelled_at is not null
),

-- One per (succeeded payment, subscription) that renews it: charge_type = 'renewal' with a
-- service period for that subscription (none: a usage-only bill); where charge_type is NULL (rows
-- older than the field), not the subscription's first succeeded payment and amount > 0. A row
-- older than `service_periods` keeps the rule it was sent under (charge_type NULL or renewal,
-- not the first, amount > 0), so an upgrade neither drops nor re-keys a delivered renewal.
-- fact_key = payment_id when the payment names one subscription (the key of the releases
-- before API 1.123), else payment_id:subscription_id.
subscription_renewed as (
    select
        'subscription_renewed' as fact_kind,
        case
            when subscriptions_in_payment = 1 then payment_id
            else payment_id || ':' || subscription_id
        end as fact_key,
        'Subscription Renewed' as event,
        customer_id,
        created_at as occurred_at,
        json_object(
            'subscription_id', subscription_id,
            'payment_id', payment_id,
            'amount', analytics.to_major(amount_minor, currency),
            'currency', currency,
            'period_start', analytics.iso_utc(period_start),
            'period_end', analytics.iso_utc(period_end)
        ) as properties,
        payment_id as object_id
    from (
        select
            *,
            row_number() over (
                partition by subscription_id order by created_at, payment_id
            ) as succeeded_payment_number
        from payment_subscriptions
        where status = 'succeeded'
    )
    where (charge_type = 'renewal' and has_service_period)
       or (
           (charge_type is null or (charge_type = 'renewal' and not service_periods_known))
           and succeeded_payment_number > 1
           and amount_minor > 0
       )
),

trial_started as (
    select
        'trial_started' as fact_kind,
        subscription_id as fact_key,
        'Trial Started' as event,
        customer_id,
        created_at as occurred_at,
        json_object(
            'subscription_id', subscription_id,
            'product_id', product_id,
            'trial_start_date', analytics.iso_utc(trial_start_date),
            'trial_end_date', analytics.iso_utc(trial_end_date),
            'trial_plan_name', product_name
        ) as properties,
        subscription_id as object_id
    from subscriptions
    where has_started and trial_period_days > 0
),

trial_ended as (
    select
        'trial_ended' as fact_kind,
        subscriptions.subscription_id as fact_key,
        'Trial Ended' as event,
        subscriptions.customer_id,
        subscriptions.trial_end_date as occurred_at,
        json_object(
            'subscription_id', subscriptions.subscription_id,
            'trial_start_date', analytics.iso_utc(subscriptions.trial_start_date),
            'trial_end_date', analytics.iso_utc(subscriptions.trial_end_date),
            'converted', subscriptions.trial_converted
        ) as properties,
        subscriptions.subscription_id as object_id
    from subscriptions
    cross join as_of
    where subscriptions.has_started
      and subscriptions.trial_period_days > 0
      and subscriptions.trial_end_date <= as_of.as_of
),

subscription_transition_events as (
    select
        subscription_transitions.fact_kind,
        subscription_transitions.fact_key,
        case subscription_transitions.fact_kind
            when 'subscription_on_hold' then 'Subscription On Hold'
            when 'subscription_paused' then 'Subscription Paused'
            when 'subscription_resumed' then 'Subscription Resumed'
            when 'subscription_past_due' then 'Subscription Past Due'
            when 'subscription_expired' then 'Subscription Expired'
            when 'subscription_failed' then 'Subscription Failed'
            when 'subscription_plan_changed' then 'Subscription Plan Changed'
            when 'subscription_cancellation_scheduled' then 'Subscription Cancellation Scheduled'
        end as event,
        subscriptions.customer_id,
        subscription_transitions.occurred_at,
        case
            when subscription_transitions.fact_kind = 'subscription_plan_changed' then json_object(
                'subscription_id', subscription_transitions.subscription_id,
                'previous_status', subscription_transitions.previous_status,
                'status', subscription_transitions.status,
                'previous_product_id', subscription_transitions.previous_product_id,
                'product_id', subscription_transitions.product_id,
                'previous_quantity', subscription_transitions.previous_quantity,
                'quantity', subscription_transitions.quantity
            )
            else json_object(
                'subscription_id', subscription_transitions.subscription_id,
                'previous_status', subscription_transitions.previous_status,
                'status', subscription_transitions.status
            )
        end as properties,
        subscription_transitions.subscription_id as object_id
    from subscription_transitions
    left join subscriptions
        on subscriptions.subscription_id = subscription_transitions.subscription_id
),

all_events as (
    select * from payment_completed
    union all select * from payment_failed
    union all select * from payment_recovered
    union all select * from payment_refunded
    union all select * from dispute_opened
    union all select * from dispute_resolved
    union all select * from subscription_started
    union all select * from subscription_cancelled
    union all select * from subscription_renewed
    union all select * from trial_started
    union all select * from trial_ended
    union all select * from subscription_transition_events
),

final as (
    select
        analytics.event_id(fact_kind, fact_key) as event_id,
        event,
        customer_id,
        occurred_at,
        -- stripping parses the JSON again: only do it where a null value can be present
        case
            when contains(cast(properties as varchar), ':null') then json_strip_nulls(properties)
            else properties
        end as properties,
        fact_kind,
        object_id
    from all_events
)

select
    event_id,
    event,
    customer_id,
    occurred_at,
    properties,
    fact_kind,
    object_id
from final
