"""Package layout that pyproject.toml cannot express: the top-level sql/ ships as pipelines.sql.

The SQL models, macros and data tests stay in the repository's sql/ (the one source); the wheel
carries them as package data of `pipelines.sql`, where `pipelines.transform` finds them when the
package is installed (an editable install reads sql/ in place).
"""

from pathlib import Path

from setuptools import find_packages, setup

SQL_PACKAGES = ["pipelines.sql"] + [
    f"pipelines.sql.{layer.name}"
    for layer in sorted(Path(__file__).resolve().parent.joinpath("sql").iterdir())
    if layer.is_dir()
]

setup(
    packages=[*find_packages(include=["pipelines", "pipelines.*"]), *SQL_PACKAGES],
    package_dir={"pipelines.sql": "sql"},
    # their *.sql files are package data in pyproject.toml, which overrides setup() arguments
)
