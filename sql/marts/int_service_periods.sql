-- grain: customer
-- One row per (succeeded subscription payment, subscription) that pays for a service period, with
-- the recurring revenue of that period per month, in USD. Read by mrr_monthly and
-- int_results_valid_until (a period ending moves the current MRR). The rule (docs/models.md):
-- period   the API's service period for that subscription (API 1.123 `service_periods`: exact,
--          partial after a plan change); on a row older than those fields (no charge_type or no
--          service_periods, and no period given), a non-zero payment covers [created_at, created_at + payment_frequency_count x payment_frequency_interval).
--          No period: a usage-only renewal, an on-demand charge, a payment-method update.
-- amount   the plan's pre-tax amount for a full billing period: for a `new` or `renewal` charge
--          (or NULL charge_type) of one subscription without metered usage, what the payment
--          billed minus its tax entries in the ledger, divided by the proration factor; else
--          (a plan change nets the old plan's credit, a checkout of several subscriptions has no
--          per-subscription amount, usage is mixed in) the subscription's recurring pre-tax
--          amount. Tax and metered usage never count as recurring revenue.
-- monthly  amount / months per billing period (Day = 1/30.4375, Week = 12/52, Month = 1,
--          Year = 12) x payment_frequency_count, converted at the payment's USD rate
--          (analytics.int_payments_usd: ledger USD equivalent, else the latest ledger rate).
with payment_subscriptions as (
    select * from analytics.stg_payment_subscriptions
),

payments_usd as (
    select * from analytics.int_payments_usd
),

ledger as (
    select * from analytics.int_ledger_by_object
),

subscriptions as (
    select * from analytics.int_subscriptions
),

charges as (
    select
        payment_subscriptions.*,
        subscriptions.payment_frequency_interval,
        greatest(coalesce(subscriptions.payment_frequency_count, 1), 1) as frequency_count,
        subscriptions.recurring_amount_minor,
        coalesce(ledger.tax_amount_minor, 0) as tax_amount_minor,
        -- a subscription payment without charge_type, or without the service_periods field,
        -- was written before API 1.123 described its period
        (
            payment_subscriptions.charge_type is null
            or not payment_subscriptions.service_periods_known
        ) as is_older_row,
        case
            when payment_subscriptions.currency = 'USD' then 1.0
            when payments_usd.amount > 0 then payments_usd.amount_usd / payments_usd.amount
        end as usd_per_unit
    from payment_subscriptions
    inner join subscriptions
        on subscriptions.subscription_id = payment_subscriptions.subscription_id
    left join payments_usd on payments_usd.payment_id = payment_subscriptions.payment_id
    left join ledger on ledger.object_id = payment_subscriptions.payment_id
    where payment_subscriptions.status = 'succeeded'
      and subscriptions.payment_frequency_interval in ('day', 'week', 'month', 'year')
),

periods as (
    select
        *,
        case
            when has_service_period then period_start
            when is_older_row and amount_minor > 0 then created_at
        end as covered_from,
        case
            when has_service_period then period_end
            when is_older_row and amount_minor > 0 then created_at
                + analytics.billing_interval(payment_frequency_interval, frequency_count)
        end as covered_until,
        case
            when subscriptions_in_payment = 1
                and coalesce(charge_type, 'renewal') in ('new', 'renewal')
                and not coalesce(includes_usage, false)
                then greatest(amount_minor - tax_amount_minor, 0)
                    / coalesce(nullif(proration_factor, 0), 1)
            else recurring_amount_minor
        end as plan_amount_minor
    from charges
),

final as (
    select
        payment_id,
        customer_id,
        subscription_id,
        covered_from as period_start,
        covered_until as period_end,
        plan_amount_minor / pow(10, analytics.currency_exponent(currency)) * usd_per_unit / (
            analytics.months_per_interval(payment_frequency_interval) * frequency_count
        ) as monthly_usd
    from periods
    where covered_from is not null and covered_until > covered_from
)

select
    payment_id,
    customer_id,
    subscription_id,
    period_start,
    period_end,
    monthly_usd
from final
