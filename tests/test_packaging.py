"""pyproject.toml: an SPDX license string (no setuptools warning), and accelerate installed with the
package, without loosening the torch pin."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    data = _project()
    assert data["project"]["license"] == "Apache-2.0"
    setuptools = next(Requirement(r) for r in data["build-system"]["requires"] if r.startswith("setuptools"))
    assert "76.9" not in setuptools.specifier and "77.0" in setuptools.specifier  # PEP 639 support


def test_accelerate_is_a_dependency_and_torch_stays_pinned():
    data = _project()
    deps = {Requirement(r).name: Requirement(r) for r in data["project"]["dependencies"]}
    assert "accelerate" in deps
    assert not any(
        Requirement(r).name == "accelerate" for r in data["project"]["optional-dependencies"]["test"]
    )
    assert str(deps["torch"].specifier) == "==2.13.0"
    # what the installed accelerate asks of torch admits the pinned version, so pip keeps it
    for line in importlib.metadata.requires("accelerate") or []:
        req = Requirement(line)
        if req.name == "torch" and not (req.marker and "extra" in str(req.marker)):
            assert "2.13.0" in req.specifier
    assert re.fullmatch(r"2\.13\.0(\+\w+)?", importlib.metadata.version("torch"))
