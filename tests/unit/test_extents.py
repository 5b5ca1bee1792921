from vmreplica.domain import extents as ex


def test_merge_and_select():
    assert ex.merge([(10, 5), (0, 5), (5, 5), (30, 1)]) == [(0, 15), (30, 1)]
    runs = [(0, 10, 1), (10, 10, 0), (20, 10, 1)]
    assert ex.selected(runs, ex.DIRTY) == [(0, 10), (20, 10)]
    assert ex.unselected(runs, ex.DIRTY) == [(10, 10)]


def test_classify_by_allocation():
    alloc = [(0, 100, 0), (100, 100, ex.ZERO), (200, 100, ex.HOLE | ex.ZERO), (300, 100, 0)]
    dirty = [(50, 100), (190, 20), (390, 30)]
    assert list(ex.classify(dirty, alloc)) == [
        (ex.DATA, 50, 50), (ex.ZEROED, 100, 50), (ex.ZEROED, 190, 10), (ex.TRIMMED, 200, 10),
        (ex.DATA, 390, 30),  # past the allocation runs: read it, never guess
    ]


def test_split_aligned():
    assert list(ex.split(100, 300, 128)) == [(100, 28), (128, 128), (256, 128), (384, 16)]
    assert list(ex.split(0, 256, 128)) == [(0, 128), (128, 128)]


def test_runs_from_entries():
    assert ex.runs_from_entries(4096, [512, 1, 1024, 0]) == [(4096, 512, 1), (4608, 1024, 0)]
