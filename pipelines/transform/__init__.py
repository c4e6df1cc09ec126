"""Models: build the SQL of `sql/` into the `analytics` schema, in dependency order, with data tests.

`runner` parses, orders, builds and keeps or reuses the models; `data_tests` parses and runs the
`*.tests.sql` files beside them and quarantines what they set aside.
"""

from pipelines.transform.runner import (
    EVENT_CATALOGS,
    SQL_DIR,
    ModelError,
    TransformResult,
    list_models,
    raw_table_hashes,
    run_models,
)

__all__ = [
    "EVENT_CATALOGS",
    "SQL_DIR",
    "ModelError",
    "TransformResult",
    "list_models",
    "raw_table_hashes",
    "run_models",
]
