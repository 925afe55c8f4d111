"""Builds the Go and TypeScript clients once per session (failing, not skipping, without tools)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from tests.polyglot.helpers import REPO, run


@pytest_asyncio.fixture(scope="session")
async def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go CLI (clients/go), built with the machine's Go toolchain."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("no Go toolchain on PATH: the Go client test needs `go` (1.24 or newer)")
    binary = tmp_path_factory.mktemp("go") / "mesh-chat"
    # A cold build compiles grpc-go: minutes on two cores, so the timeout is generous.
    result = await run(
        [go, "build", "-o", str(binary), "."], cwd=REPO / "clients" / "go", timeout_s=540
    )
    assert result.returncode == 0, f"go build failed:\n{result.describe()}"
    return binary


@pytest_asyncio.fixture(scope="session")
async def ts_client(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The TypeScript CLI (clients/ts), bundled by esbuild so each run starts in a blink."""
    esbuild = REPO / "node_modules" / ".bin" / "esbuild"
    node = shutil.which("node")
    if node is None or not esbuild.is_file():
        pytest.fail(f"the TS client test needs node and `npm ci` in {REPO} (missing {esbuild})")
    bundle = tmp_path_factory.mktemp("ts") / "mesh-chat.mjs"
    result = await run(
        [
            str(esbuild),
            "clients/ts/src/cli.ts",
            "--bundle",
            "--platform=node",
            "--format=esm",
            "--target=node20",
            "--log-level=warning",
            f"--outfile={bundle}",
        ]
    )
    assert result.returncode == 0, f"bundling the TS client failed:\n{result.describe()}"
    return [node, str(bundle)]
