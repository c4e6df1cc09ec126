-- grain: user
-- One row per Segment user id (customer_identity.user_id): the identify traits of every Dodo
-- customer that resolves to it, combined by each trait's meaning (docs/models.md, "user_traits").
-- With the default `[identity] user_id = ["customer_id"]` every user is one customer and each
-- trait is that customer's own. The only model that combines customers: its grain is user_id.
-- Customers quarantined by a data test (key_kind user_id = a customer_id) or forgotten are left
-- out before combining.
with customer_traits as (
    select * from analytics.customer_traits
),

customer_identity as (
    select * from analytics.customer_identity
),

quarantined_rows as (
    select * from analytics.quarantined_rows
),

forgotten_customers as (
    select * from analytics.stg_forgotten_customers
),

customers as (
    select customer_traits.*, customer_identity.user_id, customer_identity.group_id,
           customer_identity.latest_subscription_at, customer_identity.plan,
           customer_identity.country
    from customer_traits
    inner join customer_identity on customer_identity.customer_id = customer_traits.customer_id
    where customer_traits.customer_id not in (
        select key from quarantined_rows where key_kind = 'user_id'
    )
      and customer_traits.customer_id not in (select customer_id from forgotten_customers)
),

-- spend per currency over the user's customers (each customer's map is in major units)
spend_by_currency as (
    select user_id, entry.key as currency, sum(entry.value) as amount
    from (
        select user_id, unnest(map_entries(
            json_transform(total_spent_by_currency, '"MAP(VARCHAR, DOUBLE)"')
        )) as entry
        from customers
        where user_id in (select user_id from customers group by user_id having count(*) > 1)
    )
    group by user_id, entry.key
),

combined_spend as (
    select
        user_id,
        to_json(map_from_entries(list({'k': currency, 'v': amount} order by currency)))
            as total_spent_by_currency
    from spend_by_currency
    group by user_id
),

combined as (
    select
        user_id,
        count(*) as customers_count,
        -- the most recently created customer speaks for the person (contact details)
        arg_max(customer_id, (created_at, customer_id)) as dodo_customer_id,
        list(customer_id order by created_at, customer_id) as dodo_customer_ids,
        arg_max(email, (created_at, customer_id)) as email,
        arg_max(name, (created_at, customer_id)) as name,
        arg_max(phone, (created_at, customer_id)) filter (where phone is not null) as phone,
        min(created_at) as created_at,
        min(customer_since) as customer_since,
        max(last_payment_date) as last_payment_date,
        arg_max(payment_method, last_payment_date) as payment_method,
        sum(payments_count) as payments_count,
        count(distinct currency) as currencies,
        min(currency) as only_currency,
        sum(total_spent) as total_spent_sum,
        sum(total_refunded) as total_refunded_sum,
        sum(total_spent_usd) as total_spent_usd,
        bool_and(total_spent_usd is not null) as all_usd_known,
        sum(active_subscriptions) as active_subscriptions,
        arg_max(subscription_status, latest_subscription_at) as subscription_status,
        count(distinct mrr_currency) as mrr_currencies,
        sum(mrr) as mrr_sum,
        min(mrr_currency) as mrr_currency,
        bool_or(churned) and bool_and(churned or subscription_status is null) as churned,
        bool_or(past_due) as past_due,
        arg_max(plan, latest_subscription_at) as plan,
        arg_max(country, latest_subscription_at) as country,
        arg_max(group_id, latest_subscription_at) filter (where group_id is not null) as group_id,
        any_value(total_spent_by_currency) as total_spent_by_currency,
        any_value(total_spent) as total_spent,
        any_value(total_refunded) as total_refunded,
        any_value(currency) as currency,
        any_value(mrr) as mrr,
        any_value(total_spent_usd) as one_total_spent_usd
    from customers
    group by user_id
),

final as (
    select
        combined.user_id,
        combined.dodo_customer_id,
        case when combined.customers_count > 1 then combined.dodo_customer_ids end
            as dodo_customer_ids,
        combined.email,
        combined.name,
        combined.phone,
        combined.created_at,
        combined.customer_since,
        combined.last_payment_date,
        combined.payment_method,
        combined.payments_count,
        case
            when combined.customers_count = 1 then combined.total_spent
            when combined.currencies <= 1 then round(combined.total_spent_sum, 6)
            when combined.all_usd_known then round(combined.total_spent_usd, 2)
        end as total_spent,
        case
            when combined.customers_count = 1 then combined.currency
            when combined.currencies <= 1 then combined.only_currency
            when combined.all_usd_known then 'USD'
        end as currency,
        case
            when combined.customers_count = 1 then combined.total_spent_by_currency
            else coalesce(combined_spend.total_spent_by_currency, json('{}'))
        end as total_spent_by_currency,
        case
            when combined.customers_count = 1 then combined.total_refunded
            when combined.currencies <= 1 then round(combined.total_refunded_sum, 6)
        end as total_refunded,
        case
            when combined.customers_count = 1 then combined.one_total_spent_usd
            else round(combined.total_spent_usd, 2)
        end as total_spent_usd,
        combined.active_subscriptions,
        combined.subscription_status,
        case
            when combined.customers_count = 1 then combined.mrr
            when combined.mrr_currencies <= 1 then round(combined.mrr_sum, 6)
        end as mrr,
        combined.mrr_currency,
        combined.churned,
        combined.past_due,
        combined.plan,
        combined.country,
        combined.group_id
    from combined
    left join combined_spend on combined_spend.user_id = combined.user_id
)

select
    user_id,
    dodo_customer_id,
    dodo_customer_ids,
    email,
    name,
    phone,
    created_at,
    customer_since,
    last_payment_date,
    payment_method,
    payments_count,
    total_spent,
    currency,
    total_spent_by_currency,
    total_refunded,
    total_spent_usd,
    active_subscriptions,
    subscription_status,
    mrr,
    mrr_currency,
    churned,
    past_due,
    plan,
    country,
    group_id
from final
order by user_id
