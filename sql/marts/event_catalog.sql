-- grain: global
-- The event names the product's models can send, in both catalogs (`[events] catalog`).
-- `[events] skip` and `[events] rename` must name one of these or an event of the user's
-- custom_events; anything else is a configuration error (a typo would otherwise skip nothing).
-- A new product event is added here: lifecycle_events' accepted-values test reads this list.
with names as (
    select * from (values
        ('Payment Completed'), ('Order Completed'), ('Payment Failed'), ('Payment Refunded'),
        ('Order Refunded'), ('Dispute Opened'), ('Dispute Won'), ('Dispute Lost'),
        ('Subscription Started'), ('Subscription Cancelled'), ('Subscription Renewed'),
        ('Trial Started'), ('Trial Ended'), ('Subscription On Hold'), ('Subscription Paused'),
        ('Subscription Resumed'), ('Subscription Expired'), ('Subscription Failed'),
        ('Subscription Plan Changed'), ('Subscription Cancellation Scheduled'),
        ('Payment Recovered'), ('Subscription Past Due')
    ) as catalog(event)
),

final as (
    select cast(event as varchar) as event from names
)

select event from final
