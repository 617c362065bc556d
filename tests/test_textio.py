"""textio.read_text: plain, .xz and .gz give the same text; a missing, folder, corrupt, non-UTF-8 or empty file is
an error naming the flag and the file."""

import gzip
import lzma
from pathlib import Path

import pytest

from lizard_jax.cli import InputError
from lizard_jax.textio import read_text

DATA = Path(__file__).resolve().parents[1] / "data"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. — ünïcödé\n"


def test_plain_xz_gz_same_text(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(TEXT.encode()))
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(TEXT.encode()))
    assert [read_text(tmp_path / n) for n in ("a.txt", "a.txt.xz", "a.txt.gz")] == [TEXT] * 3


@pytest.mark.parametrize("name, data, error, message", [
    ("missing.txt", None, FileNotFoundError, "no such file"),
    ("folder", "dir", IsADirectoryError, "is a folder"),
    ("bad.txt.xz", b"not xz at all", InputError, "is not a valid .xz file"),
    ("cut.txt.xz", lzma.compress(TEXT.encode())[:20], InputError, "is not a valid .xz file"),
    ("bad.txt.gz", b"not gzip", InputError, "is not a valid .gz file"),
    ("latin1.txt", "café".encode("latin-1"), InputError, "is not UTF-8 text"),
    ("latin1.txt.xz", lzma.compress("café".encode("latin-1")), InputError, "is not UTF-8 text"),
    ("empty.txt", b"", InputError, "is empty"),
    ("blank.txt.gz", gzip.compress(b" \n\n"), InputError, "is empty"),
])
def test_bad_files(tmp_path, name, data, error, message):
    p = tmp_path / name
    if data == "dir":
        p.mkdir()
    elif data is not None:
        p.write_bytes(data)
    with pytest.raises(error, match=message) as e:
        read_text(p, "--text")
    assert str(e.value).startswith(f"--text {p}")


@pytest.mark.parametrize("name, size", [("wikitext-2/valid.txt.xz", 1121681), ("tinyshakespeare/input.txt.xz", 1115394),
                                        ("brown/brown.txt.xz", 5966108), ("state_union/state_union.txt.xz", 2074041)])
def test_shipped_data_complete(name, size):
    """data/README.md's files, whole (UTF-8 bytes of the original files)."""
    assert len(read_text(DATA / name).encode("utf-8")) == size
