-- Data tests of analytics.revenue_daily.

-- test: revenue_daily_date_currency_unique
-- severity: error
select date, currency, count(*) as rows
from analytics.revenue_daily
group by date, currency
having count(*) > 1 or date is null

-- test: revenue_daily_amounts_non_negative
-- severity: error
select date, currency, gross, refunds, payments
from analytics.revenue_daily
where gross < 0 or refunds < 0 or payments < 0
