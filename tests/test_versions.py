"""Versioned adapter layout: `current` resolves, switches atomically, and unversioned dirs still serve."""

from __future__ import annotations

import pytest

from errors import ConfigError
from inference import versions
from inference.adapter_meta import ADAPTER_META_FILE


def _version(d, name):
    (d / name).mkdir(parents=True)
    (d / name / ADAPTER_META_FILE).write_text("{}")


def test_current_switches_and_resolves(tmp_path):
    alice = tmp_path / "alice"
    _version(alice, "v1")
    _version(alice, "v2")
    assert versions.list_versions(alice) == ["v1", "v2"] and versions.next_version(alice) == "v3"
    versions.set_current(alice, "v1")
    assert versions.resolve(alice) == ((alice / "v1").resolve(), "v1")
    versions.set_current(alice, "v2")
    assert versions.current_version(alice) == "v2"
    with pytest.raises(ConfigError, match="not an adapter version"):
        versions.set_current(alice, "v9")
    assert versions.current_version(alice) == "v2"


def test_unversioned_and_discover(tmp_path):
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / ADAPTER_META_FILE).write_text("{}")
    (tmp_path / "empty").mkdir()
    _version(tmp_path / "alice", "v1")
    versions.set_current(tmp_path / "alice", "v1")
    assert versions.resolve(tmp_path / "bob") == (tmp_path / "bob", None)
    assert sorted(versions.discover(tmp_path)) == ["alice", "bob"]
    with pytest.raises(ConfigError, match="no adapter here"):
        versions.resolve(tmp_path / "empty")
