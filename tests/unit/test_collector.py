"""The garbage collector's settings for serving and for a rebuild's fold."""

import gc

import pytest

from engine import collector


@pytest.fixture
def restored_collector():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_serving_collects_young_objects_rarely_and_freezes_what_is_loaded(restored_collector):
    gc.set_threshold(700, 10, 10)
    loaded = {"app": ["module state"]}
    assert any(o is loaded for o in gc.get_objects())
    collector.tune_for_serving()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 0
    # What was live at the freeze is out of every generation's walk.
    assert not any(o is loaded for o in gc.get_objects())


def test_serving_still_collects_cycles_made_after_it(restored_collector):
    collector.tune_for_serving()

    class Node:
        pass

    node = Node()
    node.self = node  # a cycle, as a traceback and its frame make
    del node
    assert gc.collect() >= 1


def test_rare_collections_puts_the_thresholds_back():
    before = gc.get_threshold()
    with collector.rare_collections(123_456):
        assert gc.get_threshold() == (123_456, *before[1:])
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), collector.rare_collections():
        raise RuntimeError("a failed fold")
    assert gc.get_threshold() == before


def test_rare_collections_side_by_side_leave_the_thresholds_as_they_were():
    before = gc.get_threshold()
    outer = collector.rare_collections(100_000)
    inner = collector.rare_collections(100_000)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the first one ends first (two folds in threads)
    inner.__exit__(None, None, None)
    assert gc.get_threshold() == before
