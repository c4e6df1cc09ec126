"""Models: build the SQL of `sql/` into the `analytics` schema, in dependency order, with data tests.

`runner` parses, orders, builds and keeps or reuses the models; `data_tests` parses and runs the
`*.tests.sql` files beside them and quarantines what they set aside; `delta` and `touched` build
only the rows of the customers a run's raw changes touch; `verify` compares the models with a
full build.
"""

from pipelines.transform.delta import forget_state as forget_delta_state
from pipelines.transform.runner import (
    EVENT_CATALOGS,
    SQL_DIR,
    ModelError,
    TransformResult,
    list_models,
    raw_table_hashes,
    run_models,
)
from pipelines.transform.verify import (
    CHECKS_TABLE,
    TableDrift,
    clear_scratch,
    last_check,
    record_check,
    scratch_folder,
    verify_against_full_build,
)

__all__ = [
    "CHECKS_TABLE",
    "EVENT_CATALOGS",
    "SQL_DIR",
    "ModelError",
    "TransformResult",
    "list_models",
    "raw_table_hashes",
    "TableDrift",
    "clear_scratch",
    "forget_delta_state",
    "last_check",
    "record_check",
    "run_models",
    "scratch_folder",
    "verify_against_full_build",
]
