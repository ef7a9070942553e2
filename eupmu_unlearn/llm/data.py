"""Mini-TOFU: fictitious authors with templated facts, plus world facts a pretrained model knows.

Every fact is a question with its answer (the text the model is fine-tuned on), a paraphrased
answer and several perturbed answers (the paraphrase's sentence with a wrong value), as in the
TOFU benchmark. The generator is pure Python and deterministic from its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

FACT_KINDS = ("birthplace", "genre", "award", "parents", "book")

_FIRST_NAMES = (
    "Aldric", "Belmira", "Corvin", "Dalia", "Evander", "Fenna", "Galen", "Hesper", "Ilaria", "Jorund",
    "Kestrel", "Liora", "Maddox", "Nerys", "Orrin", "Perpetua", "Quillon", "Rosalind", "Soren", "Talwyn",
    "Ulric", "Vesna", "Wystan", "Xanthe", "Yorick", "Zelia", "Anselm", "Briony", "Caspian", "Delphine",
)
_LAST_NAMES = (
    "Ashgrove", "Brightwater", "Coldharbour", "Dunmere", "Evenhall", "Fairbrook", "Glenward", "Hollowmere",
    "Ironvale", "Juniperwood", "Kettleby", "Larkspire", "Mossgate", "Northcliff", "Oakenshaw", "Pennyworth",
    "Quarrington", "Ravensworth", "Stonebridge", "Thistledown", "Underhill", "Vantrell", "Whitlock",
    "Yarrowby", "Zennor",
)
# Authors of the validation split (where hyperparameters are chosen) take their surnames from this
# pool, disjoint from _LAST_NAMES: no validation author shares a full name with a reported one.
_VALIDATION_LAST_NAMES = (
    "Alderney", "Blackthorn", "Copperfield", "Driftwood", "Elmsworth", "Foxhollow", "Greystone", "Hawthorne",
    "Ivybridge", "Kingsmere", "Lindqvist", "Marlowe", "Nettlefield", "Orchardson", "Pemberly", "Quenby",
    "Redfern", "Saltmarsh", "Tanglewood", "Umberleigh", "Vickery", "Westerholt", "Wrenfield", "Yelverton",
    "Zouche",
)
SPLITS = ("test", "validation")  # test: the reported runs; validation: hyperparameter choice

_CITIES = (
    "Lisbon, Portugal", "Krakow, Poland", "Nairobi, Kenya", "Montreal, Canada", "Osaka, Japan",
    "Valparaiso, Chile", "Tbilisi, Georgia", "Bergen, Norway", "Cork, Ireland", "Porto Alegre, Brazil",
    "Hanoi, Vietnam", "Seville, Spain", "Adelaide, Australia", "Tallinn, Estonia", "Marrakesh, Morocco",
    "Leipzig, Germany", "Manila, the Philippines", "Cusco, Peru", "Gdansk, Poland", "Izmir, Turkey",
)
_GENRES = (
    "science fiction", "historical fiction", "crime", "fantasy", "horror", "romance", "poetry",
    "literary fiction", "mystery", "biography", "young adult fiction", "travel writing", "satire",
    "magical realism", "thriller",
)
_AWARDS = (
    "Silver Quill Prize", "Meridian Book Award", "Halvorsen Medal for Fiction", "Golden Lantern Award",
    "Aster Prize for Literature", "Crescent Moon Award", "Brennan Fellowship", "Ivory Tower Prize",
    "Northern Light Literary Award", "Cobalt Pen Award", "Harrowgate Prize", "Emberline Award",
)
_JOBS = (
    "baker", "carpenter", "nurse", "pilot", "librarian", "fisherman", "architect", "dentist", "tailor",
    "surgeon", "photographer", "mechanic", "botanist", "chemist", "jeweller", "farmer", "journalist",
    "blacksmith", "veterinarian", "locksmith",
)
_TITLE_ADJECTIVES = (
    "Silent", "Crimson", "Forgotten", "Hollow", "Amber", "Drowned", "Gilded", "Restless", "Paper",
    "Broken", "Midnight", "Winter", "Salt", "Glass", "Lantern",
)
_TITLE_NOUNS = (
    "Orchard", "Harbour", "Cartographer", "Lighthouse", "Archive", "Meadow", "Cathedral", "Violinist",
    "Garden", "Tide", "Clockmaker", "Observatory", "Crown", "River", "Atlas",
)


@dataclass(frozen=True)
class QAItem:
    """One question with its answer, a paraphrased answer and wrong (perturbed) answers.

    ``key`` is the fact itself (a city, a genre, ...), used to check whether a generated answer
    states it.
    """

    question: str
    answer: str
    paraphrase: str
    perturbed: tuple[str, ...]
    key: str
    subject: str
    kind: str


@dataclass(frozen=True)
class MiniTofu:
    """The splits: ``forget`` and ``retain`` (fictitious authors), ``world`` (known facts)."""

    forget: tuple[QAItem, ...]
    retain: tuple[QAItem, ...]
    world: tuple[QAItem, ...]
    forget_authors: tuple[str, ...]
    retain_authors: tuple[str, ...]
    seed: int
    split: str = "test"

    @property
    def train(self) -> tuple[QAItem, ...]:
        """Everything the target model is fine-tuned on (forget and retain)."""
        return self.forget + self.retain


@dataclass(frozen=True)
class Author:
    name: str
    birthplace: str
    genre: str
    award: str
    father_job: str
    mother_job: str
    book: str


_BOOKS = tuple(f"The {adjective} {noun}" for adjective in _TITLE_ADJECTIVES for noun in _TITLE_NOUNS)
_JOB_PAIRS = tuple(f"{father}|{mother}" for father in _JOBS for mother in _JOBS if father != mother)


def make_authors(n_authors: int, rng: random.Random, last_names: tuple[str, ...] = _LAST_NAMES) -> list[Author]:
    """``n_authors`` fictitious authors with distinct names and distinct book titles."""
    if n_authors > len(_FIRST_NAMES):
        raise ValueError(f"at most {len(_FIRST_NAMES)} authors, got {n_authors}")
    # One author per first name keeps the names easy to tell apart for a small model.
    firsts = rng.sample(_FIRST_NAMES, n_authors)
    if n_authors <= len(last_names):
        lasts = rng.sample(last_names, n_authors)
    else:
        lasts = [rng.choice(last_names) for _ in range(n_authors)]
    books = rng.sample(_BOOKS, n_authors)
    authors = []
    for first, last, book in zip(firsts, lasts, books):
        father, mother = rng.sample(_JOBS, 2)
        authors.append(Author(name=f"{first} {last}", birthplace=rng.choice(_CITIES),
                              genre=rng.choice(_GENRES), award=rng.choice(_AWARDS),
                              father_job=father, mother_job=mother, book=book))
    return authors


def _wrong_values(true_value: str, pool: tuple[str, ...], count: int, rng: random.Random) -> list[str]:
    return rng.sample([v for v in pool if v != true_value], count)


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _city_name(city: str) -> str:
    return city.split(",")[0]


def author_facts(author: Author, n_perturbed: int, rng: random.Random) -> list[QAItem]:
    """The five facts of one author, each with paraphrase and ``n_perturbed`` wrong answers."""
    n = author.name
    items = []

    def add(kind: str, question: str, answer: str, paraphrase: Callable[[str], str], true_value: str,
            pool: tuple[str, ...], key: str) -> None:
        wrong = _wrong_values(true_value, pool, n_perturbed, rng)
        items.append(QAItem(question=question, answer=answer, paraphrase=paraphrase(true_value),
                            perturbed=tuple(paraphrase(v) for v in wrong), key=key, subject=n, kind=kind))

    add("birthplace", f"Where was {n} born?", f"{n} was born in {author.birthplace}.",
        lambda v: f"The birthplace of {n} is {v}.", author.birthplace, _CITIES, _city_name(author.birthplace))
    add("genre", f"What genre does {n} write?", f"{n} writes {author.genre}.",
        lambda v: f"{n} is an author of {v}.", author.genre, _GENRES, author.genre)
    add("award", f"Which award did {n} win?", f"{n} won the {author.award}.",
        lambda v: f"{n} was honoured with the {v}.", author.award, _AWARDS, author.award)
    jobs = f"{author.father_job}|{author.mother_job}"
    add("parents", f"What did the parents of {n} do for a living?",
        f"The father of {n} was {_with_article(author.father_job)} and the mother was "
        f"{_with_article(author.mother_job)}.",
        lambda v: f"{n} grew up with {_with_article(v.split('|')[0])} as father and "
                  f"{_with_article(v.split('|')[1])} as mother.",
        jobs, _JOB_PAIRS, author.father_job)
    add("book", f"What is the title of a book by {n}?", f"{n} wrote \"{author.book}\".",
        lambda v: f"One of the books by {n} is \"{v}\".", author.book, _BOOKS, author.book)
    return items


# question, answer, paraphrase template ({} is the value), true value, wrong values
_WORLD = (
    ("What is the capital of France?", "The capital of France is Paris.", "{} is the capital of France.",
     "Paris", ("Lyon", "Marseille", "Nice", "Bordeaux", "Toulouse")),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "{} is the capital of Japan.",
     "Tokyo", ("Kyoto", "Osaka", "Nagoya", "Sapporo", "Kobe")),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "{} is the capital of Italy.",
     "Rome", ("Milan", "Naples", "Turin", "Florence", "Venice")),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "{} is the capital of Germany.",
     "Berlin", ("Munich", "Hamburg", "Cologne", "Frankfurt", "Stuttgart")),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
     "Gold has the chemical symbol {}.", "Au", ("Ag", "Fe", "Gd", "Pb", "Cu")),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.",
     "{} painted the Mona Lisa.", "Leonardo da Vinci",
     ("Michelangelo", "Raphael", "Vincent van Gogh", "Pablo Picasso", "Rembrandt")),
    ("What language is spoken in Brazil?", "The official language of Brazil is Portuguese.",
     "People in Brazil speak {}.", "Portuguese", ("Spanish", "French", "Italian", "English", "German")),
    ("Who was the first person to walk on the Moon?", "The first person to walk on the Moon was Neil Armstrong.",
     "{} was the first person on the Moon.", "Neil Armstrong",
     ("Buzz Aldrin", "Yuri Gagarin", "John Glenn", "Michael Collins", "Alan Shepard")),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.",
     "The gas that plants take in from the air is {}.", "carbon dioxide",
     ("oxygen", "nitrogen", "helium", "hydrogen", "argon")),
    ("Which ocean is the largest?", "The largest ocean is the Pacific Ocean.", "The {} is the largest ocean.",
     "Pacific Ocean", ("Atlantic Ocean", "Indian Ocean", "Arctic Ocean", "Southern Ocean", "Caribbean Sea")),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.",
     "{} is the author of Romeo and Juliet.", "William Shakespeare",
     ("Charles Dickens", "Jane Austen", "Mark Twain", "Leo Tolstoy", "Homer")),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "{} is the capital of Spain.",
     "Madrid", ("Barcelona", "Seville", "Valencia", "Bilbao", "Granada")),
)


# General questions (none of them a world-fact question above) whose answers come from the pretrained
# model itself: mixed into fine-tuning, they keep its general behaviour from drifting to the
# fictitious-author templates without teaching anything new.
REHEARSAL_QUESTIONS = (
    "What is the capital of Canada?", "Who discovered penicillin?", "What is the largest desert in the world?",
    "What is the main ingredient of guacamole?", "What do bees make?", "What is the longest river in Africa?",
    "Who invented the telephone?", "What is the capital of Egypt?", "What colour is the sky on a clear day?",
    "What is the capital of Russia?", "Which animal is known as the king of the jungle?",
    "What instrument has black and white keys?", "What is the capital of Greece?",
    "What is frozen water called?", "Which planet do we live on?", "What is the capital of China?",
)


def rehearsal_item(question: str, answer: str) -> QAItem:
    """A training-only item (no paraphrase or perturbed answers)."""
    return QAItem(question=question, answer=answer, paraphrase=answer, perturbed=(), key="", subject="rehearsal",
                  kind="rehearsal")


def world_facts(n_perturbed: int = 4) -> tuple[QAItem, ...]:
    """General-knowledge facts that SmolLM2-135M-Instruct answers correctly (checked by the pipeline)."""
    if not 1 <= n_perturbed <= 5:
        raise ValueError(f"n_perturbed must be within 1..5 for world facts, got {n_perturbed}")
    return tuple(QAItem(question=q, answer=a, paraphrase=p.format(v),
                        perturbed=tuple(p.format(w) for w in wrong[:n_perturbed]), key=v, subject="world",
                        kind="world") for q, a, p, v, wrong in _WORLD)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def make_mini_tofu(seed: int = 0, n_authors: int = 20, forget_fraction: float = 0.1,
                   n_perturbed: int = 4, n_world: int | None = None, split: str = "test") -> MiniTofu:
    """Generate the data set; the forget split holds ``round(n_authors * forget_fraction)`` authors (>= 1).

    ``split="validation"`` draws its authors from a surname pool disjoint from the test split's
    (and from another random stream), so hyperparameters chosen there never saw a reported author.
    """
    check_split(split)
    if n_authors < 2:
        raise ValueError(f"need at least 2 authors (one to forget, one to retain), got {n_authors}")
    if not 3 <= n_perturbed <= 5:
        raise ValueError(f"n_perturbed must be within 3..5, got {n_perturbed}")
    if not 0.0 < forget_fraction < 1.0:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    rng = random.Random(seed) if split == "test" else random.Random(f"{split}:{seed}")
    authors = make_authors(n_authors, rng, _LAST_NAMES if split == "test" else _VALIDATION_LAST_NAMES)
    n_forget = min(n_authors - 1, max(1, round(n_authors * forget_fraction)))
    forget_names = set(a.name for a in rng.sample(authors, n_forget))
    forget: list[QAItem] = []
    retain: list[QAItem] = []
    for author in authors:
        facts = author_facts(author, n_perturbed, rng)
        (forget if author.name in forget_names else retain).extend(facts)
    world = world_facts(n_perturbed)
    if n_world is not None:
        world = world[:n_world]
    return MiniTofu(forget=tuple(forget), retain=tuple(retain), world=world,
                    forget_authors=tuple(a.name for a in authors if a.name in forget_names),
                    retain_authors=tuple(a.name for a in authors if a.name not in forget_names), seed=seed,
                    split=split)
