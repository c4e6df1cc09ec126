"""dodo-segment: sync Dodo Payments to Segment through a DuckDB warehouse."""
