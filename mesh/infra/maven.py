"""Fetching from Maven Central once per machine: Kafka's broker jars, Elasticsearch's distribution.

Both come through the ``mvn`` client, whose local repository (``~/.m2``) doubles as a download
cache. A fetch works in a scratch directory and moves its result into place; a marker file,
written last, makes an interrupted fetch be redone and a completed one never run Maven again
(not even its update checks); a file lock keeps two test sessions (or CI jobs on one runner)
from fetching into the same place at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_once(target: Path, fetch: Callable[[Path], tuple[Path, str]], *, marker: str) -> Path:
    """``target`` as ``fetch`` builds it, built only if its ``marker`` file is missing.

    ``fetch(scratch)`` works in the empty directory ``scratch`` and returns the directory (inside
    it) to install as ``target`` and the text of the marker file. Returns ``target``, absolute.
    """
    target = target.absolute()
    if (target / marker).exists():
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / marker).exists():
            return target  # fetched by whoever held the lock before us
        scratch = target.parent / f"{target.name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            result, summary = fetch(scratch)
            shutil.rmtree(target, ignore_errors=True)
            result.rename(target)
            (target / marker).write_text(summary)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def run_maven(
    args: Sequence[str],
    *,
    cwd: Path,
    what: str,
    error: type[Exception],
    quiet: bool = True,
    timeout_s: float = 1800.0,
) -> None:
    """Run ``mvn args`` in batch mode in ``cwd``; raise ``error`` with its output if it fails.

    ``what`` names what is being fetched, in messages.
    """
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"Maven (mvn) is needed once to fetch {what}: apt-get install maven")
    command = [
        mvn,
        "-B",
        *(["-q"] if quiet else []),
        "-C",  # a checksum mismatch fails the fetch instead of warning
        "-Dstyle.color=never",
        *args,
    ]
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise error(f"fetching {what} took over {timeout_s:.0f} s ({' '.join(command)})") from None
    if result.returncode != 0:
        raise error(
            f"fetching {what} failed ({' '.join(command)}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
