-- Macros shared by the models. Created (schema `analytics`, persistent, so views that use them
-- also work from other connections such as the notebooks) before any model is built.

-- ISO 4217 minor-unit exponent: 0 for zero-decimal currencies, 3 for three-decimal ones, else 2.
create or replace macro analytics.currency_exponent(currency) as
    -- one CASE over the codes: a long IN list in a view's columns becomes a join that DuckDB
    -- runs over every row before any filter on the view (a delta build filters them by id)
    case upper(currency)
        when 'BIF' then 0 when 'CLP' then 0 when 'DJF' then 0 when 'GNF' then 0
        when 'ISK' then 0 when 'JPY' then 0 when 'KMF' then 0 when 'KRW' then 0
        when 'PYG' then 0 when 'RWF' then 0 when 'UGX' then 0 when 'UYI' then 0
        when 'VND' then 0 when 'VUV' then 0 when 'XAF' then 0 when 'XOF' then 0
        when 'XPF' then 0
        when 'BHD' then 3 when 'IQD' then 3 when 'JOD' then 3 when 'KWD' then 3
        when 'LYD' then 3 when 'OMR' then 3 when 'TND' then 3
        else 2
    end;

-- Integer minor units -> major units (DOUBLE), rounded to the currency's exponent.
create or replace macro analytics.to_major(amount_minor, currency) as
    round(
        cast(amount_minor as double) / pow(10, analytics.currency_exponent(currency)),
        analytics.currency_exponent(currency)
    );

-- ISO-8601 UTC string with milliseconds, independent of the session time zone.
create or replace macro analytics.iso_utc(ts) as
    strftime(timezone('UTC', ts), '%Y-%m-%dT%H:%M:%S.%gZ');

-- Stable event id: hash of the kind of fact and its immutable keys (never of the event name).
create or replace macro analytics.event_id(fact_kind, fact_key) as
    md5(fact_kind || ':' || fact_key);

-- Months per billing interval, to normalise a recurring amount to a month.
create or replace macro analytics.months_per_interval(interval_name) as
    case lower(interval_name)
        when 'day' then 1 / 30.4375
        when 'week' then 12 / 52
        when 'month' then 1.0
        when 'year' then 12.0
    end;

-- The billing interval as a DuckDB INTERVAL (count x unit).
create or replace macro analytics.billing_interval(interval_name, interval_count) as
    case lower(interval_name)
        when 'day' then to_days(cast(interval_count as integer))
        when 'week' then to_days(cast(7 * interval_count as integer))
        when 'month' then to_months(cast(interval_count as integer))
        when 'year' then to_years(cast(interval_count as integer))
    end;

-- The identify outbox's fingerprint (over its traits_hash column): its rows and the sum of a
-- hash of each traits hash, order independent, so no sort of every row. tracking_plan's
-- built_from row holds it; the emitter compares it with the outbox's now, and a plan left by
-- another set of models is not used.
create or replace macro analytics.traits_fingerprint(traits_hash) as
    cast(count(*) as varchar) || ':'
    || cast(coalesce(sum(cast(hash(traits_hash) as hugeint)), 0) as varchar);
