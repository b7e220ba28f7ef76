"""Each dataset layout, read from small files written here, gives the canonical tables;
each unusable file gives a DataError naming file, line and field."""

from __future__ import annotations

import math

import pytest

from mllmrec_ray.data import DataError, attach_images, load_csv, load_dataset, load_microlens, load_ml1m, load_ml100k
from mllmrec_ray.data import load_recbole

RECBOLE_ITEMS = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tMisérables, Les\t1995\tDrama Musical\n"
    "3\tunkonwn\tunkonwn\tunknown\n"
    "4\tLand Before Time III (1995)\tV\tAnimation\n"
)
RECBOLE_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "7\t1\t3\t881250949\n"
    "7\t2\t4.5\t881250949\n"
    "8\t3\t1\t881250950.0\n"
    "8\t4\t2\t881250951\n"
)


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def recbole_dir(tmp_path, items=RECBOLE_ITEMS, inter=RECBOLE_INTER):
    write(tmp_path / "rb" / "toy.item", items)
    write(tmp_path / "rb" / "toy.inter", inter)
    return tmp_path / "rb"


def test_recbole(tmp_path):
    items, inter = load_recbole(recbole_dir(tmp_path))
    assert list(items.columns) == ["item_id", "title", "year", "genres", "image_path"]
    assert items["item_id"].tolist() == ["1", "2", "3", "4"]
    assert items["title"].tolist() == ["Toy Story", "Misérables, Les", None, "Land Before Time III (1995)"]
    assert items["year"].tolist()[:2] == [1995, 1995] and items["year"].isna().tolist()[2:] == [True, True]
    assert items["genres"][0] == ["Animation", "Children's", "Comedy"]
    assert items["image_path"].isna().all()
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert inter["user_id"].tolist() == ["7", "7", "8", "8"]
    assert inter["timestamp"].tolist() == [881250949, 881250949, 881250950, 881250951]
    assert str(inter["timestamp"].dtype) == "int64"
    assert inter["rating"].tolist() == [3.0, 4.5, 1.0, 2.0]


def ml100k_dir(tmp_path):
    flags = ["0"] * 19
    toy = flags.copy()
    toy[3] = toy[4] = toy[5] = "1"  # Animation, Children's, Comedy
    drama = flags.copy()
    drama[8] = "1"
    unknown = flags.copy()
    unknown[0] = "1"
    lines = [
        "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(toy),
        "2|Misérables, Les (1995)|01-Jan-1996||http://x|" + "|".join(drama),  # date year wins
        "3|Nénette et Boni (1996)|||http://x|" + "|".join(drama),  # no date: the title's year
        "267|unknown||||" + "|".join(unknown),
    ]
    write(tmp_path / "ml-100k" / "u.item", "\n".join(lines) + "\n", encoding="latin-1")
    write(tmp_path / "ml-100k" / "u.data", "196\t1\t3\t881250949\n196\t2\t5\t881250948\n5\t267\t1\t881250000\n")
    return tmp_path / "ml-100k"


def test_ml100k_raw(tmp_path):
    items, inter = load_ml100k(ml100k_dir(tmp_path))
    assert items["title"].tolist() == ["Toy Story", "Misérables, Les", "Nénette et Boni", None]
    assert items["year"].tolist()[:3] == [1995, 1996, 1996] and items["year"].isna()[3]
    assert items["genres"].tolist() == [["Animation", "Children's", "Comedy"], ["Drama"], ["Drama"], ["unknown"]]
    assert inter.values.tolist() == [["196", "1", 881250949, 3.0], ["196", "2", 881250948, 5.0],
                                     ["5", "267", 881250000, 1.0]]


def test_ml1m_raw(tmp_path):
    write(tmp_path / "ml-1m" / "movies.dat",
          "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Café au Lait::Comedy\n", encoding="latin-1")
    write(tmp_path / "ml-1m" / "ratings.dat", "1::1::5::978300760\n1::2::3::978302109\n")
    items, inter = load_ml1m(tmp_path / "ml-1m")
    assert items["title"].tolist() == ["Toy Story", "Café au Lait"]
    assert items["year"][0] == 1995 and items["year"].isna()[1]
    assert items["genres"].tolist() == [["Animation", "Children's", "Comedy"], ["Comedy"]]
    assert inter["timestamp"].tolist() == [978300760, 978302109] and inter["rating"].tolist() == [5.0, 3.0]


def test_microlens_with_covers(tmp_path):
    d = tmp_path / "MicroLens-100k"
    write(d / "MicroLens-100k_pairs.csv", "user,item,timestamp\n1,10,1583636658000\n1,11,1583636659000\n")
    write(d / "MicroLens-100k_title_en.csv", 'item,title\n10,"Cats, dogs and ""quotes"""\n11,\n')
    write(d / "MicroLens-100k_covers" / "10.jpg", b"\xff\xd8jpeg")
    items, inter = load_microlens(d)
    assert items["title"].tolist() == ['Cats, dogs and "quotes"', None]
    assert items["image_path"][0] == str((d / "MicroLens-100k_covers" / "10.jpg").resolve())
    assert items["image_path"].isna()[1]
    assert inter["timestamp"].tolist() == [1583636658000, 1583636659000]
    assert inter["rating"].isna().all()


def test_csv_with_mapping_and_iso_dates(tmp_path):
    write(tmp_path / "n" / "interactions.csv", "cust,movie,date,stars\nA,m1,2005-09-06,4\nA,m2,2005-09-07 10:00:00,\n")
    write(tmp_path / "n" / "items.csv", "movie,name,yr,tags\nm1,Dinosaur Planet,2003,Documentary|Animation\nm2,Isle,,\n")
    columns = {"user": "cust", "item": "movie", "timestamp": "date", "rating": "stars", "title": "name",
               "year": "yr", "genres": "tags"}
    items, inter = load_dataset("csv", tmp_path / "n", columns)
    assert items["title"].tolist() == ["Dinosaur Planet", "Isle"]
    assert items["year"][0] == 2003 and items["year"].isna()[1]
    assert items["genres"].tolist() == [["Documentary", "Animation"], []]
    assert inter["timestamp"].tolist() == [1125964800, 1126087200]
    assert inter["rating"][0] == 4.0 and math.isnan(inter["rating"][1])
    # the interactions file itself, with the items file named
    items2, _ = load_csv(tmp_path / "n" / "interactions.csv", columns, items_path=tmp_path / "n" / "items.csv")
    assert items2["item_id"].tolist() == ["m1", "m2"]


def test_attach_images(tmp_path):
    items, _ = load_recbole(recbole_dir(tmp_path))
    img = tmp_path / "img"
    write(img / "1.png", b"p")
    write(img / "1.jpg", b"j")  # jpg is preferred over png for the same item
    write(img / "2.WEBP", b"w")
    write(img / "99.jpeg", b"x")  # no such item
    write(img / "3.txt", b"not an image")
    out, unmatched = attach_images(items, img)
    assert out["image_path"].tolist()[:2] == [str((img / "1.jpg").resolve()), str((img / "2.WEBP").resolve())]
    assert out["image_path"].isna().tolist()[2:] == [True, True]
    assert unmatched == 1
    assert items["image_path"].isna().all()  # the input table is left alone


# --- errors: the message names the file, the line and the field -----------------------------------

def assert_names(excinfo, path, line, field):
    msg = str(excinfo.value)
    assert str(path) in msg and f"line {line}" in msg and field in msg, msg


def test_missing_column(tmp_path):
    d = recbole_dir(tmp_path, inter=RECBOLE_INTER.replace("timestamp:float", "when:float"))
    with pytest.raises(DataError) as e:
        load_recbole(d)
    assert_names(e, d / "toy.inter", 1, "timestamp")


def test_duplicate_item_id(tmp_path):
    d = recbole_dir(tmp_path, items=RECBOLE_ITEMS + "2\tAgain\t1990\tDrama\n")
    with pytest.raises(DataError, match="duplicate item id '2'") as e:
        load_recbole(d)
    assert_names(e, d / "toy.item", 6, "item_id")


def test_unknown_item(tmp_path):
    d = recbole_dir(tmp_path, inter=RECBOLE_INTER + "8\t42\t1\t881250952\n")
    with pytest.raises(DataError, match="'42'") as e:
        load_recbole(d)
    assert_names(e, d / "toy.inter", 6, "item_id")


def test_non_numeric_timestamp(tmp_path):
    d = ml100k_dir(tmp_path)
    write(d / "u.data", "196\t1\t3\t881250949\n196\t2\t5\tyesterday\n")
    with pytest.raises(DataError, match="yesterday") as e:
        load_ml100k(d)
    assert_names(e, d / "u.data", 2, "timestamp")


def test_non_numeric_rating(tmp_path):
    write(tmp_path / "ml-1m" / "movies.dat", "1::Toy Story (1995)::Comedy\n")
    write(tmp_path / "ml-1m" / "ratings.dat", "1::1::5::978300760\n\n1::1::five::978300761\n")
    with pytest.raises(DataError) as e:
        load_ml1m(tmp_path / "ml-1m")
    assert_names(e, tmp_path / "ml-1m" / "ratings.dat", 3, "rating")


def test_undecodable_text(tmp_path):
    d = recbole_dir(tmp_path, items=RECBOLE_ITEMS.encode() + b"5\tBad \xff title\t1990\tDrama\n")
    with pytest.raises(DataError, match="utf-8") as e:
        load_recbole(d)
    assert_names(e, d / "toy.item", 6, "movie_title")


def test_wrong_field_count(tmp_path):
    d = ml100k_dir(tmp_path)
    write(d / "u.data", "196\t1\t3\t881250949\n196\t2\t5\n")
    with pytest.raises(DataError, match="expected 4 fields") as e:
        load_ml100k(d)
    assert "u.data" in str(e.value) and "line 2" in str(e.value)


def test_empty_ids_and_missing_files(tmp_path):
    d = tmp_path / "n"
    write(d / "interactions.csv", "user,item,timestamp\n,m1,1\n")
    write(d / "items.csv", "item,title\nm1,One\n")
    with pytest.raises(DataError) as e:
        load_csv(d)
    assert_names(e, d / "interactions.csv", 2, "user_id")
    with pytest.raises(DataError, match="no file matching"):
        load_microlens(tmp_path / "nothing-here")
    with pytest.raises(DataError, match="unknown column mapping"):
        load_csv(d, {"usr": "user"})
    with pytest.raises(DataError, match="only applies to --format csv"):
        load_dataset("recbole", d, {"user": "u"})
