"""qemu-img: create images and overlays, read their metadata and bitmaps, compare contents."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Literal, overload

from ..errors import HypervisorError, OperationError


def _run(args: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise OperationError(f"{args[0]} is not installed", hint="run `make setup`") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise HypervisorError(f"{what} failed: {msg[-1] if msg else 'exit ' + str(proc.returncode)}")
    return proc


def create(path: Path | str, size: int | None, fmt: str = "qcow2", backing: Path | str | None = None,
           options: dict | None = None) -> None:
    args = ["qemu-img", "create", "-q", "-f", fmt]
    opts = dict(options or {})
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
        if size is not None:
            args.append("-u")  # size given: do not open the backing (it may be in use)
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    _run(args, f"creating image {path}")


@overload
def info(path: Path | str, backing_chain: Literal[False] = False) -> dict: ...
@overload
def info(path: Path | str, backing_chain: Literal[True]) -> list[dict]: ...
def info(path: Path | str, backing_chain: bool = False) -> dict | list[dict]:
    """Image metadata; ``-U`` so it works while a VM or daemon has the image open. With
    ``backing_chain``, a list: the image's, then each backing file's."""
    args = ["qemu-img", "info", "-U", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    proc = _run(args + [str(path)], f"reading image {path}")
    return json.loads(proc.stdout)


def own_data(path: Path | str) -> int:
    """Bytes of guest data this image itself holds: the extents `qemu-img map` finds
    allocated with data at depth 0 (not its backing files'; not zero clusters; not its
    metadata or the free clusters `actual-size` counts). ``-U`` as for ``info``."""
    proc = _run(["qemu-img", "map", "-U", "--output=json", str(path)], f"mapping image {path}")
    return sum(int(e["length"]) for e in json.loads(proc.stdout)
               if e.get("depth") == 0 and e.get("data"))


def repair(path: Path | str) -> dict:
    """``qemu-img check -r all`` of a closed qcow2 image: refcounts rebuilt from the L1/L2
    tables, leaked clusters freed. Returns what the check found and fixed; raises an
    IntegrityError when corruption is left that it could not repair."""
    from ..errors import IntegrityError
    proc = _run(["qemu-img", "check", "-r", "all", "-f", "qcow2", "--output=json",
                 str(path)], f"checking image {path}", check=False)
    try:
        report = json.loads(proc.stdout or "{}")
    except ValueError:
        report = {}
    if proc.returncode in (0, 3):      # clean, or only leaks left (they lose nothing)
        return report
    if proc.returncode == 2:
        raise IntegrityError(f"{path} has qcow2 corruption that `qemu-img check -r all` "
                             f"could not repair ({report.get('corruptions', '?')} left)")
    msg = (proc.stderr or proc.stdout).strip().splitlines()
    raise HypervisorError(f"checking image {path} failed: {msg[-1] if msg else proc.returncode}")


def bitmaps(path: Path | str) -> list[dict]:
    """Persistent bitmaps of a qcow2 image: [{name, granularity, flags: [auto, in-use]}]."""
    data = info(path).get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps") or [])


def bitmap(path: Path | str, *operations: tuple[str, str]) -> None:
    """Run ``qemu-img bitmap`` operations, e.g. ("--remove", NAME); the image must be closed."""
    for op, name in operations:
        _run(["qemu-img", "bitmap", op, str(path), name], f"{op[2:]} bitmap {name} on {path}")


def compare(a: Path | str, b: Path | str) -> tuple[bool, str]:
    """Guest-visible comparison of two images: (identical, qemu-img's message)."""
    proc = _run(["qemu-img", "compare", "-U", str(a), str(b)], "comparing images", check=False)
    if proc.returncode not in (0, 1):
        raise HypervisorError(f"comparing {a} and {b} failed: {proc.stderr.strip()}")
    return proc.returncode == 0, (proc.stdout or proc.stderr).strip()


def resize(path: Path | str, size: int) -> None:
    """Grow (or shrink) a qcow2 image's virtual size to ``size`` bytes; an area it gains
    reads as zeros, whatever a backing file holds there."""
    _run(["qemu-img", "resize", "-q", "-f", "qcow2", "--shrink", str(path), str(int(size))],
         f"resizing image {path}")


def commit(top: Path | str, base: Path | str) -> None:
    """Write ``top``'s clusters into ``base`` (an image below it); ``top`` is left as is."""
    _run(["qemu-img", "commit", "-q", "-f", "qcow2", "-d", "-b", str(base), str(top)],
         f"committing {top} into {base}")


def rebase_unsafe(path: Path | str, backing: Path | str) -> None:
    """Point ``path`` at another backing file whose contents are the same (no data moves)."""
    _run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(backing),
          str(path)], f"rebasing {path} on {backing}")


def drop_cached_pages(*paths: Path | str) -> None:
    """Ask the kernel to drop the page cache of image files (clean pages only: what a
    storage daemon has flushed).

    A replica head keeps whatever was read or written through it in the page cache: an
    initial copy or a verification read leaves gigabytes of it there, and on this
    machine's kernel (6.18, ext4) later writes into the same file then run 3 to 4 times
    slower (64 MiB of scattered 64 KiB writes: 0.17-0.21 s against 0.05 s; measured with
    a fresh storage daemon on the same file, and restored by dropping the file's pages).
    A head is written once a cycle and read back only by a verification or a failover,
    so nothing is lost by not caching it. Best effort: an error here changes nothing.
    """
    for fd in _opened(paths):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def drop_cached_pages_later(*paths: Path | str, name: str = "uncache"):
    """``drop_cached_pages`` on a thread of its own (started, returned for a join):
    dropping a cycle's 64 MiB of clean pages costs 5-15 ms, a head read whole up to
    0.1 s, and the caller need not wait for it."""
    import threading
    t = threading.Thread(target=drop_cached_pages, args=paths, name=name, daemon=True)
    t.start()
    return t


def sync_dirs(*paths: Path | str) -> None:
    """fsync directories: the names of files created or renamed in them become durable
    (a new layer recorded in the state store must still be there after a power cut)."""
    for d in dict.fromkeys(str(p) for p in paths):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_files(*paths: Path | str) -> None:
    """fdatasync image files written by another process (a storage daemon): the kernel
    writes back each file's dirty pages and flushes the disk's cache, whoever asks. A file that is gone (its
    chain was deleted) has nothing left to make durable; any other error is raised."""
    for fd in _opened(paths, missing_only=True):
        os.fdatasync(fd)


def _opened(paths, missing_only: bool = False):
    """Each path opened read-only in turn (closed after the caller's step); a path that
    cannot be opened is skipped (with ``missing_only``, only one that does not exist)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:
            if missing_only:
                raise
            continue
        try:
            yield fd
        finally:
            os.close(fd)
