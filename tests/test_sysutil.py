from __future__ import annotations

import gc
import weakref

from netpass.sysutil import gc_frozen


class _Node:
    peer: _Node | None = None


def test_gc_frozen_leaves_older_garbage_alone_until_the_last_block_ends() -> None:
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection between making the garbage and freezing it
    try:
        gc.collect()
        node = _Node()
        node.peer = node  # a cycle: only the collector can free it
        ref = weakref.ref(node)
        del node
        with gc_frozen():
            with gc_frozen():  # a second migration in the same process
                gc.collect()
                assert ref() is not None
            gc.collect()
            assert ref() is not None and gc.get_freeze_count() > 0  # the first still runs
        gc.collect()
        assert ref() is None and gc.get_freeze_count() == 0
    finally:
        if was_enabled:
            gc.enable()
