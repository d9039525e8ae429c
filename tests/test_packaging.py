"""The declared dependency floors are the ones .ci/min_versions tests."""

from __future__ import annotations

import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO_ROOT


def _name(n: str) -> str:
    return re.sub(r"[-_.]+", "-", n).lower()


def _floors() -> dict[str, Version]:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    out = {}
    for d in deps:
        r = Requirement(d)
        lows = [Version(s.version) for s in r.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{d!r}: every core dependency needs one >= lower bound (tested by .ci/min_versions)"
        out[_name(r.name)] = lows[0]
    return out


def _pins() -> dict[str, Version]:
    out = {}
    with open(os.path.join(REPO_ROOT, ".ci", "min-versions.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                out[_name(name)] = Version(version)
    return out


def test_min_versions_pin_exactly_the_declared_floors():
    floors, pins = _floors(), _pins()
    assert set(floors) <= set(pins), f"not pinned in .ci/min-versions.txt: {sorted(set(floors) - set(pins))}"
    for name, low in floors.items():
        assert pins[name] == low, f"{name}: pyproject.toml says >= {low}, .ci/min-versions.txt pins {pins[name]}"
    extra = set(pins) - set(floors) - {"jaxlib"}  # jaxlib: jax's own, pinned beside it
    assert not extra, f"pinned but not a core dependency: {sorted(extra)}"
    assert pins["jaxlib"] == pins["jax"]
