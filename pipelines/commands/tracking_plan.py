"""`dodo-segment tracking-plan`: write the plan of what this project sends (JSON Schema or
Segment Protocols rules), from the last build of the models."""

from __future__ import annotations

import sys

import jsonschema

from pipelines import warehouse
from pipelines.config import AppConfig
from pipelines.emit import PlanError, build_plan, write_plan
from pipelines.logs import complain

FORMATS = ("json-schema", "segment")


def write_tracking_plan(config: AppConfig, fmt: str = "json-schema", out: str | None = None) -> int:
    """Write the plan to `out` (stdout when None). Exit 0; 1 when no build exists yet."""
    try:
        with warehouse.connect(config.warehouse_path, read_only=True) as con:
            plan = build_plan(con, config.segment.event_catalog)
    except (PlanError, warehouse.WarehouseError) as exc:
        complain(f"tracking-plan: {exc}")
        return 1
    # every schema of the plan is checked against its metaschema before it is handed out
    for schema in [*plan["events"].values(), plan["identify"], plan["group"]]:
        jsonschema.Draft7Validator.check_schema(schema)
    text = write_plan(plan, out, fmt)
    if out is None:
        sys.stdout.write(text)
    else:
        print(
            f"tracking plan ({fmt}): {len(plan['events'])} events, identify and group traits "
            f"-> {out}"
        )
    return 0
