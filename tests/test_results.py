"""Results files: versioned, atomic, valid JSON, never overwritten."""

import json
import math
import os

import pytest

from moe_energy.config import ConfigError
from moe_energy.storage.results import SCHEMA_VERSION, check_writable, new_document, read, write_atomic


def test_write_never_overwrites_and_cleans_temp(tmp_path):
    doc = new_document({"experts": 2}, {}, {}, {})
    p1 = write_atomic(doc, tmp_path, "run-x")
    p2 = write_atomic(doc, tmp_path, "run-x")
    p3 = write_atomic(doc, tmp_path, "run-x")
    assert [p.name for p in (p1, p2, p3)] == ["run-x.json", "run-x-1.json", "run-x-2.json"]
    assert sorted(os.listdir(tmp_path)) == ["run-x-1.json", "run-x-2.json", "run-x.json"]  # no temp left
    assert read(p1)["schema_version"] == SCHEMA_VERSION


def test_non_finite_numbers_become_null(tmp_path):
    doc = new_document({}, {}, {}, {})
    doc["models"].append({"inferences_per_joule": math.inf, "energy_j": math.nan, "x": [1.0, -math.inf]})
    text = write_atomic(doc, tmp_path, "r").read_text()
    m = json.loads(text)["models"][0]
    assert m == {"inferences_per_joule": None, "energy_j": None, "x": [1.0, None]}


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "future.json"
    p.write_text(json.dumps({"schema": "moe-energy/run", "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ConfigError, match="newer than this tool"):
        read(p)


def test_unwritable_out_dir_fails_early(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a dir")
    with pytest.raises(ConfigError, match="cannot write results there"):
        check_writable(f / "sub")
