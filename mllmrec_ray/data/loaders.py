"""Readers for the supported dataset layouts, all returning the same two tables.

items:        item_id (str), title (str | None), year (int | None), genres (list[str]),
              image_path (str | None)
interactions: user_id (str), item_id (str), timestamp (int, unix seconds or the file's unit),
              rating (float, NaN when the file has none)

Row order is the file's order: the protocol breaks timestamp ties by it.
Anything that makes a file unusable raises DataError naming file, line and field;
recoverable oddities (no title, no year, no image) stay in the tables as nulls and
are counted by the caller.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")  # preference order when an item has several

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# ML-100K item 267 has no title: the raw file says "unknown", RecBole's copy "unkonwn".
ML100K_NO_VALUE = {"unknown", "unkonwn"}
TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")  # "Toy Story (1995)" -> title, year


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names file, line and field."""


def _where(path, line, field) -> str:
    return f"{path}, line {line}, field '{field}'"


def _read_rows(path, sep: str, encoding: str, header: bool, n_fields: int | None = None):
    """Split a delimited text file into rows, keeping each row's line number.

    sep="csv" uses the csv module (quoted fields); any other sep is split literally
    (MovieLens and RecBole files are not quoted and titles contain quotes).
    Returns (column names or None, list of field lists, list of line numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        start = raw.rfind(b"\n", 0, e.start) + 1
        col = raw[start : e.start].count(b"," if sep == "csv" else sep.encode())
        names = raw.split(b"\n", 1)[0].decode(encoding, "replace").rstrip("\r")
        names = next(csv.reader([names])) if sep == "csv" else names.split(sep)
        field = names[col] if header and col < len(names) else f"#{col + 1}"
        raise DataError(f"{_where(path, line, field)}: bytes {raw[e.start:e.end]!r} are not valid {encoding}") from None

    if sep == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        numbered = ((reader.line_num, fields) for fields in reader)
    else:
        # split on "\n" only: str.splitlines() would also break latin-1 text at \x85
        numbered = ((i, line.rstrip("\r").split(sep)) for i, line in enumerate(text.split("\n"), 1))
    names, rows, lines = None, [], []
    try:
        for line, fields in numbered:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line (typically the last one)
            if header and names is None:
                names = [f.strip() for f in fields]
                n_fields = len(names)
                continue
            if n_fields is not None and len(fields) != n_fields:
                raise DataError(f"{path}, line {line}: expected {n_fields} fields, found {len(fields)}")
            rows.append(fields)
            lines.append(line)
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: {e}") from None
    if header and names is None:
        raise DataError(f"{path}, line 1: empty file, expected a header")
    return names, rows, lines


def _one(folder: Path, pattern: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise DataError(f"{folder}: no file matching {pattern}")
    return matches[0]


def _column(path, names: list[str], rows, wanted: str | tuple[str, ...], required: bool = True):
    """Values of the first header name in `wanted` that exists (names may carry a RecBole ':type')."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    bare = [n.split(":", 1)[0] for n in names]
    for w in wanted:
        for i, (n, b) in enumerate(zip(names, bare)):
            if w in (n, b):
                return [r[i] for r in rows]
    if required:
        raise DataError(f"{_where(path, 1, '|'.join(wanted))}: missing column (header has {names})")
    return None


def _timestamps(path, values, lines, field) -> np.ndarray:
    """Unix-time numbers (floats are floored) or ISO-8601 dates -> int64 seconds."""
    s = pd.Series(values, dtype=object).str.strip()
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    is_num = np.isfinite(num)  # "nan" and "inf" parse as numbers but are no times
    if is_num.all():
        return np.floor(num).astype(np.int64)
    dates = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")
    if dates.notna().all():
        return ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    neither = ~is_num & dates.isna().to_numpy()
    bad = int(np.flatnonzero(neither if neither.any() else ~is_num)[0])  # else: numbers and dates mixed
    raise DataError(f"{_where(path, lines[bad], field)}: timestamp {values[bad]!r} is not a number or an ISO date")


def _ratings(path, values, lines, field) -> np.ndarray:
    s = pd.Series(values, dtype=object).str.strip()
    s = s.mask(s == "")
    num = pd.to_numeric(s, errors="coerce")
    bad = np.flatnonzero((num.isna() & s.notna()).to_numpy())
    if len(bad):
        raise DataError(f"{_where(path, lines[bad[0]], field)}: rating {values[bad[0]]!r} is not a number")
    return num.to_numpy(dtype=np.float64)


def _year(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() else None


def _assemble(items_path, item_ids, titles, years, genres, item_lines,
              inter_path, users, inter_items, timestamps, ratings, inter_lines):
    """Validate ids and references, then build the two canonical tables."""
    item_ids = [i.strip() for i in item_ids]
    first_line = {}
    for item, line in zip(item_ids, item_lines):
        if not item:
            raise DataError(f"{_where(items_path, line, 'item_id')}: empty item id")
        if item in first_line:
            raise DataError(f"{_where(items_path, line, 'item_id')}: duplicate item id {item!r} "
                            f"(first on line {first_line[item]})")
        first_line[item] = line
    users = [u.strip() for u in users]
    inter_items = [i.strip() for i in inter_items]
    if not users:
        raise DataError(f"{inter_path}: no interactions")
    for user, item, line in zip(users, inter_items, inter_lines):
        if not user:
            raise DataError(f"{_where(inter_path, line, 'user_id')}: empty user id")
        if item not in first_line:
            raise DataError(f"{_where(inter_path, line, 'item_id')}: item {item!r} is not in {items_path}")

    items = pd.DataFrame({
        "item_id": pd.Series(item_ids, dtype=object),
        "title": pd.Series([t if t and t.strip() else None for t in titles], dtype=object),
        "year": pd.array(years, dtype="Int32"),
        "genres": pd.Series(genres, dtype=object),
        "image_path": pd.Series([None] * len(item_ids), dtype=object),
    })
    interactions = pd.DataFrame({
        "user_id": pd.Series(users, dtype=object),
        "item_id": pd.Series(inter_items, dtype=object),
        "timestamp": timestamps,
        "rating": ratings if ratings is not None else np.full(len(users), np.nan),
    })
    return items, interactions


def load_recbole(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RecBole atomic files: a directory with <name>.inter and <name>.item (tab separated,
    header `field:type`; token_seq fields are space separated)."""
    path = Path(path)
    inter_path, items_path = _one(path, "*.inter"), _one(path, "*.item")
    names, rows, lines = _read_rows(items_path, "\t", "utf-8-sig", header=True)
    ids = _column(items_path, names, rows, "item_id")
    titles = _column(items_path, names, rows, ("movie_title", "title"))
    years = _column(items_path, names, rows, ("release_year", "year"), required=False) or [None] * len(rows)
    classes = _column(items_path, names, rows, ("class", "genre", "genres"), required=False) or [""] * len(rows)
    titles = [None if t in ML100K_NO_VALUE else t for t in titles]
    years = [None if y in ML100K_NO_VALUE else _year(y) for y in years]
    genres = [c.split() for c in classes]

    inames, irows, ilines = _read_rows(inter_path, "\t", "utf-8-sig", header=True)
    ratings = _column(inter_path, inames, irows, "rating", required=False)
    return _assemble(
        items_path, ids, titles, years, genres, lines,
        inter_path, _column(inter_path, inames, irows, "user_id"), _column(inter_path, inames, irows, "item_id"),
        _timestamps(inter_path, _column(inter_path, inames, irows, "timestamp"), ilines, "timestamp"),
        None if ratings is None else _ratings(inter_path, ratings, ilines, "rating"), ilines,
    )


def load_ml100k(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The GroupLens ml-100k folder: u.data (tab: user item rating ts) and u.item
    (pipe, latin-1: id|title (year)|release date|video date|url|19 genre flags)."""
    path = Path(path)
    items_path, inter_path = path / "u.item", path / "u.data"
    _, rows, lines = _read_rows(items_path, "|", "latin-1", header=False, n_fields=5 + len(ML100K_GENRES))
    titles, years, genres = [], [], []
    for r, line in zip(rows, lines):
        m = TITLE_YEAR.match(r[1])
        title = m.group(1) if m else r[1]
        titles.append(None if title.strip() in ML100K_NO_VALUE else title)
        # the year is the release date's ("01-Jan-1995"), the title's when there is no date
        years.append(_year(r[2].strip()[-4:]) or (int(m.group(2)) if m else None))
        flags = r[5:]
        if any(f.strip() not in ("0", "1") for f in flags):
            k = next(i for i, f in enumerate(flags) if f.strip() not in ("0", "1"))
            raise DataError(f"{_where(items_path, line, ML100K_GENRES[k])}: genre flag {flags[k]!r} is not 0 or 1")
        genres.append([g for g, f in zip(ML100K_GENRES, flags) if f.strip() == "1"])

    _, irows, ilines = _read_rows(inter_path, "\t", "latin-1", header=False, n_fields=4)
    cols = list(zip(*irows)) or [[], [], [], []]
    return _assemble(
        items_path, [r[0] for r in rows], titles, years, genres, lines,
        inter_path, list(cols[0]), list(cols[1]),
        _timestamps(inter_path, list(cols[3]), ilines, "timestamp"),
        _ratings(inter_path, list(cols[2]), ilines, "rating"), ilines,
    )


def load_ml1m(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The GroupLens ml-1m folder: ratings.dat (user::movie::rating::ts) and
    movies.dat (movie::Title (1995)::Genre|Genre), latin-1."""
    path = Path(path)
    items_path, inter_path = path / "movies.dat", path / "ratings.dat"
    _, rows, lines = _read_rows(items_path, "::", "latin-1", header=False, n_fields=3)
    titles, years = [], []
    for r in rows:
        m = TITLE_YEAR.match(r[1])
        titles.append(m.group(1) if m else r[1])
        years.append(int(m.group(2)) if m else None)
    genres = [[g for g in r[2].strip().split("|") if g] for r in rows]

    _, irows, ilines = _read_rows(inter_path, "::", "latin-1", header=False, n_fields=4)
    cols = list(zip(*irows)) or [[], [], [], []]
    return _assemble(
        items_path, [r[0] for r in rows], titles, years, genres, lines,
        inter_path, list(cols[0]), list(cols[1]),
        _timestamps(inter_path, list(cols[3]), ilines, "timestamp"),
        _ratings(inter_path, list(cols[2]), ilines, "rating"), ilines,
    )


def load_microlens(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A MicroLens folder: *pairs*.csv (user,item,timestamp), *title*.csv (item,title)
    and, when present, a *cover* folder of <item>.jpg images."""
    path = Path(path)
    inter_path, items_path = _one(path, "*pairs*.csv"), _one(path, "*title*.csv")
    names, rows, lines = _read_rows(items_path, "csv", "utf-8-sig", header=True)
    ids = _column(items_path, names, rows, ("item", "videoID", "item_id"))
    titles = _column(items_path, names, rows, "title")

    inames, irows, ilines = _read_rows(inter_path, "csv", "utf-8-sig", header=True)
    items, interactions = _assemble(
        items_path, ids, titles, [None] * len(ids), [[] for _ in ids], lines,
        inter_path, _column(inter_path, inames, irows, ("user", "userID", "user_id")),
        _column(inter_path, inames, irows, ("item", "videoID", "item_id")),
        _timestamps(inter_path, _column(inter_path, inames, irows, "timestamp"), ilines, "timestamp"),
        None, ilines,
    )
    covers = sorted(p for p in path.glob("*cover*") if p.is_dir())
    if covers:
        items, _ = attach_images(items, covers[0])
    return items, interactions


CSV_KEYS = ("user", "item", "timestamp", "rating", "title", "year", "genres")


def load_csv(path, columns: dict[str, str] | None = None, items_path=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generic interactions CSV + items CSV (Netflix-style dumps).

    `path` is a folder holding interactions.csv and items.csv, or the interactions CSV
    itself with `items_path` beside it. `columns` maps the canonical names (user, item,
    timestamp, title and optionally rating, year, genres) to the files' headers; the item
    column has the same name in both files. Genres are "|"-separated.
    """
    path = Path(path)
    inter_path = path / "interactions.csv" if path.is_dir() else path
    items_path = Path(items_path) if items_path else inter_path.with_name("items.csv")
    cols = {k: k for k in ("user", "item", "timestamp", "title")}
    unknown = set(columns or {}) - set(CSV_KEYS)
    if unknown:
        raise DataError(f"unknown column mapping keys {sorted(unknown)}; allowed: {list(CSV_KEYS)}")
    cols.update(columns or {})

    names, rows, lines = _read_rows(items_path, "csv", "utf-8-sig", header=True)
    ids = _column(items_path, names, rows, cols["item"])
    titles = _column(items_path, names, rows, cols["title"])
    years = _column(items_path, names, rows, cols["year"]) if "year" in cols else [None] * len(rows)
    genres = _column(items_path, names, rows, cols["genres"]) if "genres" in cols else [""] * len(rows)

    inames, irows, ilines = _read_rows(inter_path, "csv", "utf-8-sig", header=True)
    ratings = _column(inter_path, inames, irows, cols["rating"]) if "rating" in cols else None
    return _assemble(
        items_path, ids, titles, [_year(y) for y in years],
        [[g.strip() for g in s.split("|") if g.strip()] for s in genres], lines,
        inter_path, _column(inter_path, inames, irows, cols["user"]), _column(inter_path, inames, irows, cols["item"]),
        _timestamps(inter_path, _column(inter_path, inames, irows, cols["timestamp"]), ilines, cols["timestamp"]),
        None if ratings is None else _ratings(inter_path, ratings, ilines, cols["rating"]), ilines,
    )


def attach_images(items: pd.DataFrame, images_dir) -> tuple[pd.DataFrame, int]:
    """Set image_path (absolute) for every item with a file <item_id>.<jpg|jpeg|png|webp>;
    items without one get None. Returns the new table and the number of image files
    that match no item."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found")
    files = [f for f in images_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
    found: dict[str, Path] = {}
    for f in sorted(files, key=lambda f: (IMAGE_EXTS.index(f.suffix.lower()), f.name)):
        found.setdefault(f.stem, f)
    items = items.copy()
    items["image_path"] = pd.Series([str(found[i].resolve()) if i in found else None for i in items["item_id"]],
                                    dtype=object, index=items.index)
    return items, len(set(found) - set(items["item_id"]))


FORMATS = ("recbole", "ml-100k", "ml-1m", "microlens", "csv")


def load_dataset(fmt: str, path, columns: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) of a dataset in one of FORMATS."""
    if fmt == "csv":
        return load_csv(path, columns)
    if columns:
        raise DataError(f"--columns only applies to --format csv, not {fmt}")
    loaders = {"recbole": load_recbole, "ml-100k": load_ml100k, "ml-1m": load_ml1m, "microlens": load_microlens}
    if fmt not in loaders:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return loaders[fmt](path)
