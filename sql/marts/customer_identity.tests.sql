-- Data tests of analytics.customer_identity.

-- test: customer_identity_customer_id_unique_user_id_not_null
-- severity: error
select customer_id, count(*) as rows
from analytics.customer_identity
group by customer_id
having count(*) > 1 or bool_or(user_id is null)

-- test: customer_identity_user_id_claimed_by_different_emails
-- severity: warn
-- one user id resolved by customers with different emails: the same person under two emails,
-- or a metadata value copied to the wrong customer. Listed, not quarantined: they get one
-- identify with combined traits (docs/models.md, user_traits).
select user_id, count(*) as customers, list(distinct lower(email) order by lower(email)) as emails
from analytics.customer_identity
group by user_id
having count(distinct lower(email)) > 1

-- test: customer_identity_invalid_user_id_values
-- severity: warn
-- a configured metadata source held a value that cannot be a user id (empty, not a string or
-- number, over 255 characters): the next source was used
select customer_id, user_id, user_id_source, invalid_values
from analytics.customer_identity
where invalid_values > 0
