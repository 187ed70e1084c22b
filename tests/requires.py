"""Tests that need a component the machine may lack: a system package (Chromium, HAProxy, PulseAudio,
PortAudio) or an optional library (nagisa, soynlp, torchao, pyte).

On a developer's machine a missing component skips the test, saying what to install. Under CI
(``CI`` set, as CI services set it and ``.ci/run`` runs) it fails with the same reason: CI
installs every component, so one that is missing is a broken CI, not a test to leave out.

``@requires(reason)`` marks a test (``reason`` is None when the component is there; conftest.py
checks the mark before any fixture is set up); ``import_required`` imports a library from inside a
test or a helper; ``missing`` skips or fails at once.
"""

from __future__ import annotations

import importlib
import os
from importlib.util import find_spec
from types import ModuleType
from typing import NoReturn

import pytest

MARK = "requires"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """The component the test needs is missing: skip, or fail under CI."""
    __tracebackhide__ = True  # reports name the test's line, not this one
    if under_ci():
        pytest.fail(f"missing component (CI must have it): {reason}", pytrace=False)
    pytest.skip(reason)


def requires(reason: str | None) -> pytest.MarkDecorator:
    """Mark a test that needs a component: ``reason`` says what is missing, None when nothing is."""
    return getattr(pytest.mark, MARK)(reason)


def check(item: pytest.Item) -> None:
    """Before ``item`` is set up: fail it under CI if one of its ``requires`` marks names a missing
    component; elsewhere mark it to be skipped, which pytest reports at the test's own line."""
    __tracebackhide__ = True
    for mark in item.iter_markers(MARK):
        if mark.args[0] is not None:
            if under_ci():
                missing(mark.args[0])
            item.add_marker(pytest.mark.skip(reason=mark.args[0]))


def absent_module(name: str, install: str) -> str | None:
    """Why the library ``name`` is missing (``install`` says where it comes from), or None."""
    return None if find_spec(name) is not None else f"{name} is not installed ({install})"


def import_required(name: str, install: str) -> ModuleType:
    __tracebackhide__ = True
    reason = absent_module(name, install)
    if reason is not None:
        missing(reason)
    return importlib.import_module(name)
