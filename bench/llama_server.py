"""``python -m bench.llama_server build``: the benchmark's anchor, built once per machine.

The ``batching`` row compares the agent with ``llama-server`` built from the llama.cpp sources
vendored in the llama-cpp-python sdist the project pins, so both sides run the same llama.cpp.
This module downloads that sdist with pip (which checks it against the registry's digest),
checks it against our own pin as well, and builds only the ``llama-server`` target with cmake
into a cache directory. Nothing here runs in CI or in the tests: the build takes about seven
minutes on two cores.

python -m bench.llama_server build     # idempotent: skips when the binary exists
python -m bench.llama_server path      # print the binary's path (exit 1 when not built)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
# SHA-256 of SDIST as PyPI serves it, pinned on 2026-11-30 so a changed upload is noticed.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BUILD_COMMAND = "python -m bench.llama_server build"

# Only the server target; no tests, examples or web UI, and nothing fetched at build time
# (the prebuilt UI is downloaded from Hugging Face unless switched off). The CPU instruction
# set matches the Makefile's build of the library llama-cpp-python loads (GGML_NATIVE=OFF),
# so the anchor differs from our engine in how it schedules work, not in its kernels.
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF",
)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the built binary lives: ``$XDG_CACHE_HOME/mesh/llama-server/<version>``."""
    env = os.environ if environ is None else environ
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mesh" / "llama-server" / VERSION


def binary_path(environ: Mapping[str, str] | None = None) -> Path:
    """Path of the built ``llama-server`` (which may not exist yet)."""
    env = os.environ if environ is None else environ
    override = env.get("MESH_BENCH_LLAMA_SERVER")
    if override:
        return Path(override)
    return cache_dir(env) / "bin" / "llama-server"


def find_binary(environ: Mapping[str, str] | None = None) -> Path | None:
    """The built binary, or None when it has not been built on this machine."""
    path = binary_path(environ)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _say(message: str) -> None:
    print(f"[llama-server] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(into: Path) -> Path:
    _say(f"downloading the llama-cpp-python=={VERSION} sdist with pip")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--dest",
            str(into),
            f"llama-cpp-python=={VERSION}",
        ],
        check=True,
    )
    sdist = into / SDIST
    actual = _sha256(sdist)
    if actual != SDIST_SHA256:
        raise RuntimeError(
            f"{SDIST} has sha256 {actual}, expected {SDIST_SHA256}; refusing to build it"
        )
    return sdist


def _unpack(sdist: Path, into: Path) -> Path:
    _say("unpacking")
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    source = into / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no vendored llama.cpp in {sdist}")
    return source


def _build(source: Path, build_dir: Path, jobs: int, log: Path) -> Path:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    with log.open("ab") as sink:
        _say(f"configuring (cmake); log: {log}")
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_ARGS],
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=True,
        )
        _say(f"compiling target llama-server with {jobs} jobs (about 7 minutes on 2 cores)")
        process = subprocess.Popen(
            ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        last = 0.0
        for line in process.stdout:
            sink.write(line)
            text = line.decode(errors="replace").strip()
            # Ninja and Make both print "[done/total]" or "[ pct%]"; one line every 15 s.
            if text.startswith("[") and time.monotonic() - last > 15:
                last = time.monotonic()
                _say(text.split("]", 1)[0] + "]")
        if process.wait() != 0:
            raise RuntimeError(f"the llama-server build failed; see {log}")
    built = build_dir / "bin" / "llama-server"
    if not built.is_file():
        raise RuntimeError(f"the build finished without {built}; see {log}")
    return built


def build(*, jobs: int | None = None, force: bool = False) -> Path:
    """Build ``llama-server`` into :func:`cache_dir` unless it is there already."""
    target = cache_dir() / "bin" / "llama-server"
    if target.is_file() and not force:
        _say(f"already built: {target}")
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed to build llama-server")
    started = time.monotonic()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as scratch:
        work = Path(scratch)
        source = _unpack(_download(work), work)
        built = _build(source, work / "build", jobs or os.cpu_count() or 1, log)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # atomic: a half-copied binary is never "already built"
    _say(f"built {target} in {time.monotonic() - started:.0f} s")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="download the sdist and build llama-server")
    build_cmd.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    build_cmd.add_argument("--force", action="store_true", help="build again even if present")
    sub.add_parser("path", help="print the binary's path; exit 1 when it is not built")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(jobs=args.jobs, force=args.force))
        return 0
    found = find_binary()
    if found is None:
        print(f"llama-server not built: run {BUILD_COMMAND}", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
