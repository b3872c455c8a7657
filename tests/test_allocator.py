"""The commands that run models raise glibc's malloc thresholds themselves (no special environment needed); elsewhere
it does nothing."""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exitwise import allocator
from exitwise.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")

TESTS = str(Path(__file__).resolve().parent)


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                              "keepcost".split()]


def mmapped_by_a_large_malloc() -> int:
    """How many blocks malloc holds as separate mmaps while a 4 MiB block is allocated (1 with glibc's thresholds, 0
    once raised: the block comes from the heap)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
    before = libc.mallinfo2().hblks
    block = libc.malloc(4 << 20)
    grown = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(block))
    return grown


PROBE = """
import sys
from exitwise.allocator import keep_freed_memory
from test_allocator import mmapped_by_a_large_malloc
applied = keep_freed_memory() if sys.argv[1] == "raise" else False
print(applied, mmapped_by_a_large_malloc())
"""


def glibc_with_mallinfo2() -> bool:
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    return libc is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_on_glibc_a_large_block_comes_from_the_heap_once_raised():
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS} | {"PYTHONPATH": f"{SRC}:{TESTS}"}
    probe = lambda mode: subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,  # noqa: E731
                                        text=True, check=True, timeout=60).stdout.split()
    assert probe("plain") == ["False", "1"]  # glibc's default: 4 MiB gets its own mmap, unmapped again on free
    assert probe("raise") == ["True", "0"]


def test_elsewhere_or_where_the_user_set_malloc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("argv, raised", [
    (["study", "--model", "no-such-model", "--out", "{tmp}/s"], True),
    (["calibrate", "--from", "{tmp}/none", "--out", "{tmp}/c", "--target", "0.9"], True),
    (["export", "--from", "{tmp}/none", "--out", "{tmp}/e"], True),
    (["predict", "--export", "{tmp}/none", "{tmp}/x.png"], False),
    (["models"], False),
])
def test_the_commands_that_run_models_raise_the_thresholds_first(tmp_path, monkeypatch, capsys, argv, raised):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    main([a.format(tmp=tmp_path) for a in argv])  # these fail on the missing input: the call comes before
    assert calls == ([1] if raised else [])


def report_mmapped_blocks() -> None:
    """A `make_runner` for a server process that fails on purpose, its one-line error the process's count."""
    from exitwise.errors import UserError
    raise UserError(f"mmapped blocks: {mmapped_by_a_large_malloc()}")


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_serve_processes_raise_the_thresholds_in_each_process_they_spawn(monkeypatch):
    """`exitwise serve --processes N` raises them in its own process, which a spawned server process does not
    inherit: each raises them itself, before its model is built."""
    pytest.importorskip("fastapi")
    from exitwise.config import ServeConfig
    from exitwise.deploy.processes import serve_processes
    from exitwise.errors import UserError
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="^mmapped blocks: 0$"):
        serve_processes(report_mmapped_blocks, ServeConfig(port=0, processes=2))
