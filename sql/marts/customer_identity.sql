-- grain: customer
-- One row per customer of stg_customers: who the customer is in Segment (user_id) and which
-- account they belong to (group_id), by the `[identity] user_id` and `[group] id` settings
-- (analytics.identity_rules, written by the runner from the config).
-- A source gives a value when it is a string or a number (numbers become strings), not blank
-- after trimming, and at most 255 characters; anything else falls through to the next source and
-- is counted in invalid_values. customer_id is always the last resort (a customer is never
-- left without an id). subscription/payment metadata: the earliest object (created_at, id) of
-- the customer with a valid value, so the id does not move when later objects differ.
-- Also the customer's latest subscription (created_at, subscription_id): its product (plan,
-- product_id), billing country, and the B2B details the group is named after.
-- Per customer only: every column is computed from the customer's own rows.
with customers as (
    select * from analytics.stg_customers
),

subscriptions as (
    select * from analytics.stg_subscriptions
),

payments as (
    select * from analytics.stg_payments
),

products as (
    select * from analytics.stg_products
),

identity_rules as (
    select * from analytics.identity_rules
),

user_id_rules as (
    select * from identity_rules where role = 'user_id'
),

-- every (customer, rule) that reads metadata: the raw JSON value of each object that has one
metadata_values as (
    select customers.customer_id, rules.priority, rules.role, customers.created_at,
           customers.customer_id as object_id, json_extract(customers.metadata, rules.json_path) as raw
    from customers
    inner join identity_rules as rules on rules.kind = 'customer_metadata'
    union all
    select subscriptions.customer_id, rules.priority, rules.role, subscriptions.created_at,
           subscriptions.subscription_id, json_extract(subscriptions.metadata, rules.json_path)
    from subscriptions
    inner join identity_rules as rules on rules.kind = 'subscription_metadata'
    union all
    select payments.customer_id, rules.priority, rules.role, payments.created_at,
           payments.payment_id, json_extract(payments.metadata, rules.json_path)
    from payments
    inner join identity_rules as rules on rules.kind = 'payment_metadata'
),

checked_values as (
    select
        customer_id, priority, role, created_at, object_id,
        case
            when json_type(raw) in ('VARCHAR', 'BIGINT', 'UBIGINT', 'DOUBLE')
                and length(trim(raw ->> '$')) between 1 and 255
                then trim(raw ->> '$')
        end as value
    from metadata_values
    where raw is not null and json_type(raw) <> 'NULL'
),

metadata_candidates as (
    select
        customer_id,
        priority,
        role,
        arg_min(value, (created_at, object_id)) filter (where value is not null) as value,
        count(*) filter (where value is null) > 0 as had_invalid
    from checked_values
    group by customer_id, priority, role
),

user_id_candidates as (
    select customer_id, priority, value, had_invalid and value is null as invalid
    from metadata_candidates
    where role = 'user_id'
    union all
    select
        customers.customer_id,
        rules.priority,
        case when length(trim(customers.email)) between 1 and 255 then trim(customers.email) end,
        customers.email is not null and not (length(trim(customers.email)) between 1 and 255)
    from customers
    inner join user_id_rules as rules on rules.kind = 'email'
    union all
    select customers.customer_id, rules.priority, customers.customer_id, false
    from customers
    inner join user_id_rules as rules on rules.kind = 'customer_id'
),

resolved as (
    select
        customer_id,
        arg_min(value, priority) filter (where value is not null) as user_id,
        min(priority) filter (where value is not null) as resolved_priority
    from user_id_candidates
    group by customer_id
),

invalid_counts as (
    select
        user_id_candidates.customer_id,
        count(*) filter (
            where user_id_candidates.invalid
              and user_id_candidates.priority < coalesce(resolved.resolved_priority, 2147483647)
        ) as invalid_values
    from user_id_candidates
    left join resolved on resolved.customer_id = user_id_candidates.customer_id
    group by user_id_candidates.customer_id
),

latest_subscription as (
    select
        customer_id,
        arg_max(
            {
                'subscription_id': subscription_id,
                'created_at': created_at,
                'product_id': product_id,
                'product_name': product_name,
                'billing_country': billing_country,
                'tax_id': tax_id,
                'customer_business_name': customer_business_name
            },
            (created_at, subscription_id)
        ) as latest
    from subscriptions
    group by customer_id
),

group_candidates as (
    select
        latest_subscription.customer_id,
        case rules.kind
            when 'tax_id' then latest_subscription.latest.tax_id
            when 'customer_business_name' then latest_subscription.latest.customer_business_name
        end as group_id
    from latest_subscription
    inner join identity_rules as rules
        on rules.role = 'group_id' and rules.kind in ('tax_id', 'customer_business_name')
    union all
    select customer_id, value
    from metadata_candidates
    where role = 'group_id'
),

groups as (
    select customer_id, any_value(group_id) filter (where group_id is not null) as group_id
    from group_candidates
    group by customer_id
),

first_rule as (
    select min(priority) as priority from user_id_rules
),

final as (
    select
        customers.customer_id,
        coalesce(resolved.user_id, customers.customer_id) as user_id,
        case
            when resolved.user_id is null then 'customer_id'
            else (select source from user_id_rules where priority = resolved.resolved_priority)
        end as user_id_source,
        resolved.user_id is null
            or resolved.resolved_priority > (select priority from first_rule) as fell_back,
        coalesce(invalid_counts.invalid_values, 0) as invalid_values,
        customers.email,
        customers.created_at,
        groups.group_id,
        latest_subscription.latest.created_at as latest_subscription_at,
        latest_subscription.latest.product_id as plan_product_id,
        coalesce(products.name, latest_subscription.latest.product_name) as plan,
        latest_subscription.latest.billing_country as country,
        latest_subscription.latest.customer_business_name as business_name
    from customers
    left join resolved on resolved.customer_id = customers.customer_id
    left join invalid_counts on invalid_counts.customer_id = customers.customer_id
    left join groups on groups.customer_id = customers.customer_id
    left join latest_subscription on latest_subscription.customer_id = customers.customer_id
    left join products on products.product_id = latest_subscription.latest.product_id
)

select
    customer_id,
    user_id,
    user_id_source,
    fell_back,
    invalid_values,
    email,
    created_at,
    group_id,
    latest_subscription_at,
    plan_product_id,
    plan,
    country,
    business_name
from final
order by customer_id
