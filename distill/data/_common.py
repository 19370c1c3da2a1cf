"""Helpers shared by the data-set loaders: layout checks with exact errors, count checks, caches."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

from distill.data.base import Sample
from distill.errors import DistillError


def cache_root() -> Path:
    """Where derived data (the embedded set, crops, extracted images) goes: ``$DISTILL_CACHE`` or ``~/.cache/distill``."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def inside_root(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` for a path read from a data set's file; ``DistillError`` (naming ``where``, e.g.
    ``"images.txt, line 3"``) when ``rel`` is absolute or climbs out of ``root`` with ``..``."""
    normal = os.path.normpath(rel)
    if Path(rel).is_absolute() or normal == "." or Path(normal).parts[0] == "..":
        raise DistillError(f"{where}: path '{rel}' leaves the data set's root {root}; paths must be relative and stay inside it")
    return root / normal


def derived_dir(name: str, root: Path, what: str, cache_dir: str | None) -> Path:
    """The directory for files derived from the data set at ``root`` (crops, extracted images):
    ``cache_dir`` when given, else ``cache_root()/<name>-<hash of root>/<what>``. Never inside
    ``root``: loaders do not write into a data set's tree."""
    if cache_dir:
        target = Path(cache_dir).expanduser()
        if target.resolve().is_relative_to(root.resolve()):
            raise DistillError(f"{name}: cache_dir {target} is inside the data set {root}; choose a directory outside it")
        return target
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_root() / f"{name}-{digest}" / what


def dataset_root(name: str, path: str | None, holds: str) -> Path:
    """The data set's directory; ``holds`` says what belongs in it (for the error message)."""
    if not path:
        raise DistillError(f"{name} needs a path: --data {name}:PATH, where PATH holds {holds}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DistillError(f"{name}: directory not found: {root} (it should hold {holds})")
    return root


def require(name: str, path: Path, what: str = "file") -> Path:
    """``path`` itself, or a ``DistillError`` naming the missing file or directory."""
    ok = path.is_dir() if what == "directory" else path.is_file()
    if not ok:
        raise DistillError(f"{name}: missing {what} {path}")
    return path


def reject_options(name: str, options: dict, allowed: Sequence[str]) -> None:
    if options:
        raise DistillError(
            f"{name} does not take the option(s) {', '.join(sorted(options))}; it takes: {', '.join(allowed)}"
        )


def read_table(path: Path, form: str, types: Sequence[type], header: str | None = None) -> list[tuple[int, tuple]]:
    """Rows of a whitespace-separated text file as ``(line number, typed values)``; blank lines skipped.

    ``form`` describes a row (``"<image_id> <path>"``) for the error message, which names the file
    and the line of the first malformed row.
    """
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DistillError(f"{path} is not a UTF-8 text file") from None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if header is not None and number == 1:
            if parts != header.split():
                raise DistillError(f"{path}, line 1: expected the header '{header}', got '{line.strip()}'")
            continue
        if not parts:
            continue
        try:
            if len(parts) != len(types):
                raise ValueError
            rows.append((number, tuple(t(p) for t, p in zip(types, parts))))
        except ValueError:
            raise DistillError(f"{path}, line {number}: expected '{form}', got '{line.strip()}'") from None
    return rows


def check_counts(name: str, root: Path, counts: dict[str, int], official: dict[str, int]) -> None:
    """Warn, naming each difference, when a full-looking copy differs from the official release.

    A copy looks full when it has more than half the official number of images: a much smaller
    copy is taken to be a deliberate subset and is not warned about.
    """
    images = sum(v for k, v in counts.items() if k.endswith("_images"))
    official_images = sum(v for k, v in official.items() if k.endswith("_images"))
    if images <= official_images / 2:
        return
    diffs = [f"{k.replace('_', ' ')} {counts[k]:,} (official {v:,})" for k, v in official.items() if counts[k] != v]
    if diffs:
        warnings.warn(
            f"{name} at {root} does not match the official release: {', '.join(diffs)}; "
            "is the download partial or damaged?",
            stacklevel=3,
        )


def build_cache(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``final`` atomically: ``fill`` a temp directory beside it, then rename it.

    A crash leaves no half-filled ``final``; when another process (a DDP rank) finished first,
    its directory is kept and ours is discarded.
    """
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    except OSError as err:
        raise DistillError(f"cannot create the cache {final}: {err.strerror} (choose another place with cache_dir)") from None
    try:
        fill(tmp)
        os.rename(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and final.is_dir():
            return final  # another process renamed its copy first
        if isinstance(err, OSError):
            raise DistillError(
                f"cannot write the cache {final}: {err.strerror or err} (free disk space, or choose another place "
                "with cache_dir or DISTILL_CACHE)", exit_code=1,
            ) from None
        raise
    return final


def class_counts(prefix: str, samples: list[Sample]) -> dict[str, int]:
    """``{prefix_classes: ..., prefix_images: ...}`` of a sample list."""
    return {f"{prefix}_classes": len({s.label for s in samples}), f"{prefix}_images": len(samples)}
