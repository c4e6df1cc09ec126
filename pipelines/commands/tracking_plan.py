"""`dodo-segment tracking-plan`: write the plan of what this project sends (JSON Schema or
Segment Protocols rules), from the last build of the models."""

from __future__ import annotations

import argparse
import sys

import jsonschema

from pipelines import warehouse
from pipelines.commands.common import Subcommands, add_command, add_common, load_command_config
from pipelines.config import AppConfig
from pipelines.emit import PlanError, build_plan, write_plan
from pipelines.logs import complain

FORMATS = ("json-schema", "segment")

DESCRIPTION = (
    "Write the plan of what this project sends, from the last build of the models: a JSON "
    "Schema per event of the active catalog (built-in and custom events, [events] renames and "
    "skips applied), for the identify traits and for the group traits, with types and required "
    "keys from the models' output. Every message is checked against the plan before it is sent "
    "([tracking_plan] path: against a written plan instead)."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`tracking-plan` and its flags."""
    parser = add_command(
        commands, "tracking-plan", summary, DESCRIPTION, handle,
        "examples:\n  dodo-segment tracking-plan --out tracking_plan.json\n"
        "  dodo-segment tracking-plan --format segment --out protocols_rules.json",
    )  # fmt: skip
    parser.add_argument(
        "--format", dest="plan_format", choices=FORMATS, default="json-schema",
        help="json-schema (default) or segment (Protocols tracking plan rules)",
    )  # fmt: skip
    parser.add_argument("--out", metavar="PATH", help="write to this file (default: stdout)")
    add_common(parser)


def handle(args: argparse.Namespace) -> int:
    """Write the plan with the job's configuration."""
    return write_tracking_plan(load_command_config(args), args.plan_format, args.out)


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
