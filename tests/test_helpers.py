"""The tests' own rules: real-data tests skip on a machine without ``shared/`` beside the clone, but
fail in CI, which must not lose them without a word."""

import pytest

from conftest import SHARED, require_shared


def test_a_missing_shared_file_skips_the_test_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="beside the clone"):
        require_shared(SHARED / "no-such-file.h5")


def test_a_missing_shared_file_fails_the_test_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="which CI=true requires"):
        require_shared(SHARED / "no-such-file.h5")
