"""tests/requires.py: a missing component skips a test on a developer's machine and fails it under CI."""

from __future__ import annotations

import pytest

from .requires import check, import_required, missing, requires

NOT_CI = [None, "", "0", "false"]


def _ci(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_component_fails_under_ci_with_its_reason(monkeypatch, ci):
    _ci(monkeypatch, ci)
    with pytest.raises(pytest.fail.Exception, match=r"^missing component \(CI must have it\): needs HAProxy$"):
        missing("needs HAProxy")


@pytest.mark.parametrize("ci", NOT_CI)
def test_a_missing_component_skips_elsewhere_with_its_reason(monkeypatch, ci):
    _ci(monkeypatch, ci)
    with pytest.raises(pytest.skip.Exception, match=r"^needs HAProxy$"):
        missing("needs HAProxy")


def test_the_mark_fails_the_test_under_ci(monkeypatch, request):
    _ci(monkeypatch, "true")
    request.node.add_marker(requires(None))
    check(request.node)  # present: nothing happens
    request.node.add_marker(requires("needs Debian's chromium"))
    with pytest.raises(pytest.fail.Exception, match="needs Debian's chromium$"):
        check(request.node)


@pytest.mark.parametrize("ci", NOT_CI)
def test_the_mark_skips_the_test_elsewhere(monkeypatch, request, ci):
    _ci(monkeypatch, ci)
    request.node.add_marker(requires(None))
    check(request.node)
    assert request.node.get_closest_marker("skip") is None
    request.node.add_marker(requires("needs Debian's chromium"))
    check(request.node)  # pytest's own skip mark, evaluated next, reports the test's line
    assert request.node.get_closest_marker("skip").kwargs == {"reason": "needs Debian's chromium"}


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), (None, pytest.skip.Exception)])
def test_a_missing_library(monkeypatch, ci, outcome):
    _ci(monkeypatch, ci)
    assert import_required("json", "the standard library").dumps(1) == "1"
    with pytest.raises(outcome, match=r"no_such_library_here is not installed \(asrlive\[nothing\]\)$"):
        import_required("no_such_library_here", "asrlive[nothing]")
