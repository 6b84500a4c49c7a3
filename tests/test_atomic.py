"""util.atomic: a failed write leaves the old file intact and no temporary behind."""
import pytest

from util.atomic import write_atomic, write_bytes_atomic, write_text_atomic


def test_writes_create_parents_and_replace(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert write_text_atomic(target, "first\n") == target
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"complete")

    def dies_half_way(tmp):
        tmp.write_bytes(b"trunc")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, dies_half_way)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
