"""Fetching from Maven Central once per machine: Kafka's broker jars, Elasticsearch's distribution.

Both come through the ``mvn`` client, whose local repository (``~/.m2``) doubles as a download
cache. Maven's own checksum policy is not what we rely on: Central serves no checksum file for
some artifacts (the Elasticsearch zip), and a mirror may serve none at all. Instead every file a
fetch produces is checked against the SHA-256 digests pinned in ``mesh.infra.digests``, and a
missing, extra or different file fails the fetch.

A fetch works in a scratch directory and moves its result into place only once verified; a
marker file, written last, makes an interrupted fetch be redone and a completed one never run
Maven again (not even its update checks); a file lock keeps two test sessions (or CI jobs on one
runner) from fetching into the same place at once. ``fresh=True`` fetches again into an empty,
throwaway Maven repository, as a machine that never ran the project would: CI does that on every
run so the cold path cannot rot unnoticed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from mesh.infra.digests import sha256_file


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


def fetch_once(
    target: Path, fetch: Callable[[Path], tuple[Path, str]], *, marker: str, fresh: bool = False
) -> Path:
    """``target`` as ``fetch`` builds it, built only if its ``marker`` file is missing.

    ``fetch(scratch)`` works in the empty directory ``scratch`` and returns the directory (inside
    it) to install as ``target`` and the text of the marker file. Returns ``target``, absolute.
    ``fresh`` builds it again even when complete; the old one stays until the new one is ready.
    """
    target = target.absolute()
    if (target / marker).exists() and not fresh:
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / marker).exists() and not fresh:
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
    fresh: bool = False,
) -> None:
    """Run ``mvn args`` in batch mode in ``cwd``; raise ``error`` with its output if it fails.

    ``what`` names what is being fetched, in messages. ``fresh`` runs on an empty, throwaway
    local repository instead of ``~/.m2``: Maven downloads everything, plugins included.
    """
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"Maven (mvn) is needed once to fetch {what}: apt-get install maven")
    with maven_repository(fresh) as repository:
        command = [
            mvn,
            "-B",
            *(["-q"] if quiet else []),
            # Lax: a missing checksum file only warns. verify_digests is the check that counts.
            "-c",
            "-Dstyle.color=never",
            *([f"-Dmaven.repo.local={repository}"] if repository else []),
            *args,
        ]
        try:
            result = subprocess.run(
                command, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise error(
                f"fetching {what} took over {timeout_s:.0f} s ({' '.join(command)})"
            ) from None
    if result.returncode != 0:
        raise error(
            f"fetching {what} failed ({' '.join(command)}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )


@contextlib.contextmanager
def maven_repository(fresh: bool) -> Iterator[Path | None]:
    """The local repository for a fetch: ``~/.m2`` (None), or a throwaway empty one if ``fresh``."""
    if not fresh:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="mesh-m2-") as empty:
        yield Path(empty)


def verify_digests(
    directory: Path,
    pinned: Mapping[str, str],
    *,
    pattern: str,
    what: str,
    error: type[Exception],
) -> None:
    """Check that the files matching ``pattern`` in ``directory`` are exactly ``pinned``.

    Raise ``error`` naming each missing, unexpected or different file (with the expected and
    actual SHA-256), so that a person can tell a corrupt download from a changed dependency.
    """
    found = {path.name: path for path in directory.glob(pattern) if path.is_file()}
    problems = [f"missing: {name}" for name in sorted(pinned.keys() - found.keys())]
    problems += [
        f"not pinned (the dependency set changed?): {name}"
        for name in sorted(found.keys() - pinned.keys())
    ]
    for name in sorted(found.keys() & pinned.keys()):
        got = sha256_file(found[name])
        if got != pinned[name]:
            problems.append(f"{name}: expected sha256 {pinned[name]}, got {got}")
    if problems:
        raise error(
            f"{what}: the download does not match the digests pinned in mesh/infra/digests.py, "
            "so nothing was installed:\n  "
            + "\n  ".join(problems)
            + "\nA corrupt or tampered download: run the fetch again with --fresh (an empty"
            " Maven repository). A deliberate version change: pin the new digests in"
            " mesh/infra/digests.py."
        )


def add_fetch_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], what: str
) -> None:
    """The ``fetch [--fresh]`` subcommand of a launcher's command line."""
    fetch = commands.add_parser("fetch", help=f"fetch {what} into the state dir (once per machine)")
    fetch.add_argument(
        "--fresh",
        action="store_true",
        help="fetch again through an empty Maven repository, as a new machine would",
    )
