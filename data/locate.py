"""Finding the data directory and fingerprinting files.

``resolve_data_dir`` picks the directory in a fixed, documented order (explicit
argument, then the ``CARBONFED_DATA_DIR`` environment variable, then the
``shared/data`` folder beside the repository root) and guarantees the returned
path is an existing directory; otherwise it raises :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from carbonfed.data.errors import DataError

DATA_DIR_ENV = "CARBONFED_DATA_DIR"


def default_data_dir() -> Path:
    """The ``shared/data`` folder beside the repository root (may not exist)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data directory as an absolute, existing :class:`Path`.

    Order: ``data_dir`` if given; else ``$CARBONFED_DATA_DIR`` if set and
    non-empty; else :func:`default_data_dir` if it exists. A directory chosen
    explicitly (argument or environment) that does not exist is an error; it is
    never silently replaced by the fallback.

    Raises:
        DataError: no directory could be found, or the chosen one is not a directory.
    """
    if data_dir is not None:
        return _existing_dir(Path(data_dir), "the data_dir argument (--data-dir)")
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return _existing_dir(Path(env), f"the environment variable {DATA_DIR_ENV}")
    fallback = default_data_dir()
    if fallback.is_dir():
        return fallback
    raise DataError(
        "no data directory found: pass --data-dir (data_dir=...) or set "
        f"{DATA_DIR_ENV} to the folder holding the CSV files; the default "
        f"location {fallback} does not exist"
    )


def _existing_dir(path: Path, origin: str) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data directory {path} (from {origin}) does not exist or is not a directory")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of the file's bytes.

    Raises:
        DataError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {path} to hash it: {exc}") from exc
    return digest.hexdigest()
