"""The demo guest's record reader: top record, contiguous run and the first gap, read
from real qcow2 images (sizes that are and are not whole MiB)."""
import subprocess

import pytest

from vmreplica.hypervisor.guest import RECORD, read_demo_records


def _record(seq: int) -> bytes:
    return (RECORD + str(seq).encode()).ljust(512, b"\0")


def _image(tmp_path, size: int, records: dict[int, int], extra: dict[int, bytes] | None = None):
    data = bytearray(size)
    for sector, seq in records.items():
        data[sector * 512:(sector + 1) * 512] = _record(seq)
    for offset, text in (extra or {}).items():
        data[offset:offset + len(text)] = text
    raw, image = tmp_path / "d.raw", tmp_path / "d.qcow2"
    raw.write_bytes(bytes(data))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)
    return image


SIZES = [64 << 20, 1000 << 10]


@pytest.mark.parametrize("size", SIZES)
def test_contiguous_records_without_a_gap(tmp_path, size):
    image = _image(tmp_path, size, {0: 5, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5})
    assert read_demo_records(image) == {"top": 5, "contiguous": 5, "gap_at": None}


@pytest.mark.parametrize("size", SIZES)
def test_a_record_after_a_missing_one_is_a_gap_up_to_the_disks_last_sector(tmp_path, size):
    image = _image(tmp_path, size, {0: 4, 1: 1, 2: 2, size // 512 - 1: 9})
    assert read_demo_records(image) == {"top": 4, "contiguous": 2, "gap_at": 3}


def test_a_record_not_on_a_sector_boundary_is_not_one(tmp_path):
    image = _image(tmp_path, 1 << 20, {0: 1, 1: 1}, extra={3 * 512 + 7: _record(5)[:40]})
    assert read_demo_records(image)["gap_at"] is None


def test_a_prefix_read_sees_only_the_top_record(tmp_path):
    image = _image(tmp_path, 64 << 20, {0: 7, 1: 1})
    assert read_demo_records(image, limit_sectors=1) == {"top": 7, "contiguous": 0,
                                                         "gap_at": None}
