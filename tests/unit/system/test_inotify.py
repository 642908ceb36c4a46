"""inotify through libc: which files of a directory were written."""

from __future__ import annotations

import select
from pathlib import Path

from hyperfence.system.inotify import DirectoryWatch


def test_written_and_created_files_are_named_and_the_descriptor_wakes_a_select(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    watch = DirectoryWatch(str(tmp_path))
    try:
        assert watch.read() == set()  # nothing since the watch began
        assert select.select([watch], [], [], 0)[0] == []
        with open(tmp_path / "a", "a") as f:
            f.write("2")
        (tmp_path / "b").write_text("3")
        assert select.select([watch], [], [], 5)[0] == [watch]
        assert watch.read() == {"a", "b"}
        assert watch.read() == set()  # drained
        (tmp_path / "a").read_text()  # a read is no write
        assert watch.read() == set()
    finally:
        watch.close()
