"""dlt's per-run lookups kept once a process give dlt the answers it computes itself."""

from __future__ import annotations

import typing

import dlt
import pytest
from dlt.common import validation
from dlt.common.configuration.exceptions import ConfigFieldMissingException
from dlt.common.configuration.providers import environ
from dlt.common.configuration.specs.base_configuration import is_secret_hint
from dlt.common.destination.capabilities import DestinationCapabilitiesContext
from dlt.common.schema.typing import TColumnSchema, TTableSchema
from dlt.common.typing import TSecretStrValue, get_type_hints
from dlt.destinations.impl.duckdb.configuration import DuckDbClientConfiguration, DuckDbCredentials

from pipelines.extract import dlt_lookups, make_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_kept_lookups_answer_as_dlt_does(tmp_path):
    """Every config field's secret-ness and every schema TypedDict's hints, as dlt computes them."""
    dlt_lookups.install()
    dlt_lookups.install()  # idempotent: wrapped once
    assert environ.is_secret_hint is not is_secret_hint
    hints = [
        hint
        for spec in (DuckDbClientConfiguration, DuckDbCredentials)
        for hint in typing.get_type_hints(spec).values()
    ] + [typing.Optional[str], TSecretStrValue, list[str], typing.Any]  # noqa: UP045
    secret = [environ.is_secret_hint(h) for h in hints]
    assert secret == [is_secret_hint(h) for h in hints]
    assert any(secret) and not all(secret)  # both answers occur: the check can fail
    for spec in (TTableSchema, TColumnSchema):
        kept = validation.get_type_hints(spec)
        assert kept == get_type_hints(spec)
        kept.clear()  # a caller's change does not reach the kept answer
        assert validation.get_type_hints(spec) == get_type_hints(spec)


def test_destination_capabilities_unchanged_with_partial_configuration_kept(tmp_path):
    """The run's destination answers `capabilities()` as a plain one does, resolving once."""
    path = str(tmp_path / "warehouse.duckdb")
    plain = dlt.destinations.duckdb(path)
    kept = make_pipeline(path).destination
    first, again = kept.capabilities(), kept.capabilities()
    assert isinstance(first, DestinationCapabilitiesContext)
    assert dict(first) == dict(plain.capabilities()) == dict(again)
    assert first is not again  # fresh capabilities each time, only the configuration is kept
    assert kept.configuration(None, accept_partial=True) is kept.configuration(
        None, accept_partial=True
    )
    # the full resolution (behind `client()`) is dlt's own each time: it still asks for what
    # a partial configuration may lack
    for destination in (plain, kept):
        with pytest.raises(ConfigFieldMissingException, match="dataset_name"):
            destination.configuration(None)
