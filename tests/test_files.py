"""The one atomic-write helper every cache and report file goes through."""

import pytest

from precsearch.files import atomic_write


def test_atomic_write_creates_replaces_and_leaves_no_scratch(tmp_path):
    path = atomic_write(tmp_path / "sub" / "cache.json", "one")
    assert path.read_text() == "one"
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic_write(tmp_path / "cache.json", "old")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cache.json"]
