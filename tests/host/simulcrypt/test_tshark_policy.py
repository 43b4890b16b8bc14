"""Issue 10 (fresh machine): without tshark, `make test` passes outside CI with a one-line
hint, and CI (CI=true) fails instead of skipping."""
import pytest

from . import conftest


def test_without_tshark_outside_ci_skips_with_a_one_line_hint(monkeypatch):
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        conftest.tshark_or_skip()
    msg = str(info.value)
    assert "\n" not in msg and "apt-get install tshark" in msg


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_without_tshark_in_ci_fails(monkeypatch, value):
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="tshark is missing"):
        conftest.tshark_or_skip()


def test_with_tshark_returns_its_path(monkeypatch):
    monkeypatch.setattr(conftest.shutil, "which", lambda name: "/usr/bin/tshark")
    monkeypatch.setenv("CI", "true")
    assert conftest.tshark_or_skip() == "/usr/bin/tshark"
