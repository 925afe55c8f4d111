#!/usr/bin/env python3
"""Time `make run` in a checkout: from the command's start to the chat prompt and to the first
streamed token of one question, as a user at the terminal would see them.

    scripts/time-make-run.py [CHECKOUT]          # default: this checkout
    scripts/time-make-run.py --clone             # a fresh clone of HEAD, this machine's caches
    scripts/time-make-run.py --cold              # a fresh clone of HEAD with an empty HOME

`--clone` clones HEAD into a scratch directory (no .venv, no .state): a fresh clone on a warm
machine. `--cold` also points HOME at an empty directory, so pip's wheel cache is empty
(llama-cpp-python compiles) and the model package downloads, as on a machine that never ran the
project. Prints one line per moment,
in seconds since `make run` started. Only the standard library: it runs before `make setup`.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "Name three colours of the rainbow."
PROMPT = b"you> "
TIMEOUT_S = 3600.0


def _clone(scratch: Path, *, cold: bool) -> tuple[Path, dict[str, str]]:
    source = Path(__file__).resolve().parent.parent
    checkout = scratch / "repo"
    subprocess.run(["git", "clone", "-q", str(source), str(checkout)], check=True)
    if not cold:
        return checkout, dict(os.environ)
    home = scratch / "home"
    home.mkdir()
    return checkout, {**os.environ, "HOME": str(home)}


def time_make_run(checkout: Path, env: dict[str, str]) -> dict[str, float]:
    """Run `make run`, ask QUESTION at the first prompt, then end the chat (EOF)."""
    started = time.monotonic()
    moments: dict[str, float] = {}
    process = subprocess.Popen(
        ["make", "run"],
        cwd=checkout,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdin is not None and process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen = b""
    asked_at = -1  # offset in `seen` just after the question's prompt
    while process.poll() is None and time.monotonic() - started < TIMEOUT_S:
        if not selector.select(timeout=1.0):
            continue
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            break
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        seen += chunk
        now = time.monotonic() - started
        if "mesh up" not in moments and b"mesh up:" in seen:
            moments["mesh up"] = now
        if asked_at < 0 and PROMPT in seen:
            moments["chat prompt"] = now
            asked_at = seen.index(PROMPT) + len(PROMPT)
            process.stdin.write(QUESTION.encode() + b"\n")
            process.stdin.close()  # one question, then EOF ends the chat and stops the mesh
        elif asked_at >= 0 and "first token" not in moments:
            if re.search(rb"\S", seen[asked_at:]):
                moments["first token"] = now
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
    moments["make run exited"] = time.monotonic() - started
    return moments


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", nargs="?", type=Path, default=Path(__file__).parent.parent)
    parser.add_argument("--clone", action="store_true", help="fresh clone, this machine's caches")
    parser.add_argument("--cold", action="store_true", help="fresh clone, empty HOME")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mesh-run-") as scratch:
        if args.cold or args.clone:
            checkout, env = _clone(Path(scratch), cold=args.cold)
        else:
            checkout, env = args.checkout.resolve(), dict(os.environ)
        moments = time_make_run(checkout, env)
    print()
    for name, seconds in moments.items():
        print(f"time-make-run: {name}: {seconds:.1f} s")
    return 0 if "first token" in moments else 1


if __name__ == "__main__":
    sys.exit(main())
