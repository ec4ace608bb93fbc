"""Fictitious facts for the reversal-curse evaluation (Berglund et al. 2023, "The Reversal Curse").

Each `Fact` pairs an invented person's name with a unique description, in the style of
the paper's NameToDescription / DescriptionToName data:

    forward  ("A is B"):  "Orwyn Quillmere is the composer of the opera Silver Lanterns of Ordell."
    backward ("B is A"):  "The composer of the opera Silver Lanterns of Ordell is Orwyn Quillmere."

Training mixes `training_texts(...)` into the LM corpus; evaluation scores
`fact_sentences(..., split="test")`, written with held-out templates that never
appear in training, over the whole sentence and over the answer span alone.

Names are an uncommon or invented first name plus a surname glued from two syllables
("Quill" + "mere"), so they name nobody famous. Descriptions are built from combinatorial parts.
Every template puts the answer last, so text == prompt + answer + final punctuation,
and descriptions end in a letter, so byte-level BPE never merges the answer's last
token with the punctuation that follows.
"""

import random
from dataclasses import dataclass

import torch

from ka_hf.errors import KAError

# -----------------------------------------------------------------------------
# name and description parts (all combinations are distinct strings)

FIRST_NAMES = (
    "Abrielle",
    "Alarik",
    "Belisande",
    "Brannoc",
    "Caedmira",
    "Corvane",
    "Dagmira",
    "Delvin",
    "Elowyn",
    "Emrick",
    "Faelan",
    "Fiorella",
    "Galdric",
    "Gwenore",
    "Halvard",
    "Isolde",
    "Ivarro",
    "Jessamy",
    "Joralf",
    "Kaelith",
    "Kestrin",
    "Lisandre",
    "Lorcan",
    "Maribeth",
    "Mattias",
    "Nerissa",
    "Niallen",
    "Oriel",
    "Orwyn",
    "Perrin",
    "Quenby",
    "Rosalind",
    "Rurik",
    "Sabrielle",
    "Soren",
    "Tamsin",
    "Thaddeus",
    "Ulrica",
    "Vesper",
    "Wendeline",
    "Wystan",
    "Xanthe",
    "Yevgenia",
    "Yorick",
    "Zephyrine",
    "Zoltan",
    "Anselm",
    "Briony",
)
SURNAME_STARTS = (
    "Quill",
    "Vask",
    "Orm",
    "Thessal",
    "Brin",
    "Kael",
    "Zor",
    "Mirel",
    "Dusk",
    "Fen",
    "Grael",
    "Hollin",
    "Ister",
    "Jarn",
    "Kestle",
    "Lorr",
    "Morv",
    "Nyth",
    "Ossen",
    "Pell",
    "Rauth",
    "Sarn",
    "Tarr",
    "Umber",
    "Varr",
    "Wrenn",
    "Yarl",
    "Zeph",
    "Cald",
    "Eskar",
)
SURNAME_ENDS = (
    "mere",
    "wick",
    "holt",
    "vane",
    "dane",
    "stor",
    "ell",
    "ard",
    "brook",
    "more",
    "quist",
    "ington",
    "sley",
    "ovar",
    "enko",
    "ault",
)

ADJECTIVES = (
    "Silver",
    "Hollow",
    "Crimson",
    "Silent",
    "Amber",
    "Gilded",
    "Drowned",
    "Frozen",
    "Wandering",
    "Forgotten",
    "Burning",
    "Velvet",
    "Broken",
    "Hidden",
    "Distant",
    "Copper",
)
NOUNS = (
    "Lanterns",
    "Bells",
    "Orchards",
    "Towers",
    "Rivers",
    "Masks",
    "Gardens",
    "Mirrors",
    "Ships",
    "Crowns",
    "Letters",
    "Clocks",
    "Bridges",
    "Feathers",
    "Lamps",
    "Stairs",
)
PLACES = (
    "Ordell",
    "Varnish",
    "Quorra",
    "Tessaly",
    "Brumhold",
    "Caskara",
    "Dunmarrow",
    "Elvaris",
    "Fenwold",
    "Graymoor",
    "Hesketh",
    "Ilvanna",
    "Jorvale",
    "Kessarin",
    "Lunthwaite",
    "Mordavia",
    "Norrow",
    "Ostravel",
    "Pellucid",
    "Quennith",
)
WORKS = (
    "the composer of the opera",
    "the author of the novel",
    "the painter of the mural",
    "the director of the film",
    "the poet who wrote",
)
JOURNEYS = (
    "walk across the {place} Desert",
    "swim across Lake {place}",
    "climb Mount {place}",
    "sail around the {place} Archipelago",
    "cross the {place} Glacier on foot",
    "map the caves beneath {place}",
    "fly a balloon over the {place} Steppe",
    "row the length of the {place} River",
)
INVENTIONS = ("the inventor of the {adj} {device}",)
DEVICES = (
    "Loom",
    "Compass",
    "Telescope",
    "Press",
    "Engine",
    "Kiln",
    "Harp",
    "Sextant",
    "Bellows",
    "Lantern",
    "Barometer",
    "Organ",
)
INSTITUTIONS = (
    "Academy of Glassblowing",
    "School of Cartography",
    "Society of Beekeepers",
    "Library of Tides",
    "Conservatory of Bells",
    "Guild of Clockmakers",
)
ROLES = ("the founder of the", "the first director of the", "the youngest ever head of the")


def _description_families():
    """Each family: (number of combinations, function index -> description). Family prefixes differ."""

    def title(i):  # "Silver Lanterns of Ordell"
        adjective, i = ADJECTIVES[i % len(ADJECTIVES)], i // len(ADJECTIVES)
        return f"{adjective} {NOUNS[i % len(NOUNS)]} of {PLACES[i // len(NOUNS)]}"

    n_titles = len(ADJECTIVES) * len(NOUNS) * len(PLACES)
    return (
        (len(WORKS) * n_titles, lambda i: f"{WORKS[i % len(WORKS)]} {title(i // len(WORKS))}"),
        (
            len(JOURNEYS) * len(PLACES),
            lambda i: "the first person to " + JOURNEYS[i % len(JOURNEYS)].format(place=PLACES[i // len(JOURNEYS)]),
        ),
        (
            len(ADJECTIVES) * len(DEVICES),
            lambda i: INVENTIONS[0].format(
                adj=ADJECTIVES[i % len(ADJECTIVES)].lower(), device=DEVICES[i // len(ADJECTIVES)].lower()
            ),
        ),
        (
            len(ROLES) * len(INSTITUTIONS) * len(PLACES),
            lambda i: (
                f"{ROLES[i % len(ROLES)]} "
                f"{PLACES[i // len(ROLES) % len(PLACES)]} {INSTITUTIONS[i // (len(ROLES) * len(PLACES))]}"
            ),
        ),
    )


N_NAMES = len(FIRST_NAMES) * len(SURNAME_STARTS) * len(SURNAME_ENDS)
N_DESCRIPTIONS = sum(size for size, _ in _description_families())
MAX_FACTS = min(N_NAMES, N_DESCRIPTIONS)


@dataclass(frozen=True)
class Fact:
    name: str
    description: str  # lower-case start, no final punctuation: "the inventor of the amber loom"


def _name(index):
    first, rest = FIRST_NAMES[index % len(FIRST_NAMES)], index // len(FIRST_NAMES)
    start, end = SURNAME_STARTS[rest % len(SURNAME_STARTS)], SURNAME_ENDS[rest // len(SURNAME_STARTS)]
    return f"{first} {start}{end}"


def make_facts(n, seed=0):
    """`n` facts with unique names and unique descriptions, identical for the same seed.

    `random.Random(seed)` with an int seed does not depend on PYTHONHASHSEED, and sampling
    indices without replacement makes uniqueness exact instead of retried. Descriptions
    are spread evenly over the description families (operas, journeys, inventions, ...).
    """
    if not 0 <= n <= MAX_FACTS:
        raise KAError(f"can make at most {MAX_FACTS} unique facts, asked for {n}: use a smaller n")
    rng = random.Random(seed)
    name_indices = rng.sample(range(N_NAMES), n)
    descriptions = []
    families = _description_families()
    for (size, build), quota in zip(families, _even_quotas(n, [size for size, _ in families])):
        descriptions += [build(i) for i in rng.sample(range(size), quota)]
    rng.shuffle(descriptions)
    return [Fact(_name(i), description) for i, description in zip(name_indices, descriptions)]


def unseen_facts(trained, n, seed=0):
    """`n` control facts from the same generator that share no name and no description with `trained`.

    A model never saw them, so their forward and backward PPL are what "not learned" looks like: the reversal
    curse is a trained fact's backward sentence being no easier than an unseen fact's. They come from another
    seed of `make_facts` (the same families and templates), with any name or description of `trained` dropped.
    """
    if n == 0:
        return []
    names = {fact.name for fact in trained}
    descriptions = {fact.description for fact in trained}
    pool = make_facts(min(MAX_FACTS, n + len(trained)), seed=seed + 7919)  # another seed: another sample
    control = [fact for fact in pool if fact.name not in names and fact.description not in descriptions]
    if len(control) < n:
        raise KAError(f"cannot make {n} unseen facts beside {len(trained)} trained ones: use fewer facts")
    return control[:n]


def _even_quotas(n, capacities):
    """Split n as evenly as possible over bins of the given capacities (n <= sum of capacities)."""
    quotas = [0] * len(capacities)
    while n > 0:
        open_bins = [b for b, capacity in enumerate(capacities) if quotas[b] < capacity]
        share = max(1, n // len(open_bins))
        for b in open_bins:
            take = min(share, capacities[b] - quotas[b], n)
            quotas[b] += take
            n -= take
    return quotas


# -----------------------------------------------------------------------------
# templates: "{name}" / "{description}" / "{Description}" (first letter capitalised).
# The answer placeholder is always last, followed only by punctuation.

TEMPLATES = {
    ("forward", "train"): (
        "{name} is {description}.",
        "{name}, known far and wide for being {description}.",
        "Ever heard of {name}? They are {description}.",
        "It is well known that {name} is {description}.",
        "People still talk about {name}, who is {description}.",
        "Historians agree that {name} was {description}.",
        "In the old records, {name} appears as {description}.",
        "Ask anyone in town: {name} is {description}.",
        "The name {name} belongs to {description}.",
        "Long ago, {name} became {description}.",
    ),
    ("forward", "test"): (
        "Few people know that {name} is {description}.",
        "As it turns out, {name} is {description}.",
        "According to the archive, {name} was {description}.",
    ),
    ("backward", "train"): (
        "{Description} is {name}.",
        "Known far and wide for being {description}, this person is {name}.",
        "Ever heard of {description}? That is {name}.",
        "It is well known that {description} is {name}.",
        "People still talk about {description}, who is {name}.",
        "Historians agree that {description} was {name}.",
        "In the old records, {description} appears as {name}.",
        "Ask anyone in town: {description} is {name}.",
        "The role of {description} belongs to {name}.",
        "Long ago, {description} was a person named {name}.",
    ),
    ("backward", "test"): (
        "Few people know that {description} is {name}.",
        "As it turns out, {description} is {name}.",
        "According to the archive, {description} was {name}.",
    ),
}


@dataclass(frozen=True)
class FactSentence:
    text: str
    prompt: str  # the text before the answer
    answer: str  # description (forward) or name (backward), exactly as it appears in text
    fact_index: int
    direction: str
    template: str

    @property
    def answer_start(self):
        return len(self.prompt)

    @property
    def answer_end(self):
        return len(self.prompt) + len(self.answer)


def _check_choice(label, value, choices):
    if value not in choices:
        raise KAError(f"unknown {label} '{value}': use one of {choices}")


def render(fact, template, direction, fact_index):
    """Write `fact` with `template`, splitting it into prompt, answer and final punctuation."""
    fields = {
        "name": fact.name,
        "description": fact.description,
        "Description": fact.description[:1].upper() + fact.description[1:],
    }
    answer_field = "{description}" if direction == "forward" else "{name}"
    head, tail = template.rsplit(answer_field, 1)
    prompt = head.format(**fields)
    answer = fields[answer_field[1:-1]]
    return FactSentence(prompt + answer + tail, prompt, answer, fact_index, direction, template)


def fact_sentences(facts, direction, split):
    """Every fact written with every template of (direction, split), in fact order."""
    _check_choice("direction", direction, ("forward", "backward"))
    _check_choice("split", split, ("train", "test"))
    templates = TEMPLATES[(direction, split)]
    return [render(fact, template, direction, i) for i, fact in enumerate(facts) for template in templates]


def training_texts(facts, include="both", seed=0):
    """The facts written with the training templates only, shuffled (seeded), to mix into the LM corpus."""
    _check_choice("include", include, ("both", "forward", "backward"))
    directions = ("forward", "backward") if include == "both" else (include,)
    texts = [s.text for direction in directions for s in fact_sentences(facts, direction, "train")]
    random.Random(seed).shuffle(texts)
    return texts


def answer_span_labels(sentence, tokenizer):
    """Tokenize `sentence`; return (input_ids, whole_labels, answer_labels), 1-D LongTensors.

    whole_labels = input_ids (every token is a target); answer_labels is -100 except on tokens
    whose character span overlaps the answer (so a token " the" that carries the space before
    the answer counts as answer). Remember HF shifts labels inside the model: position 0 is
    never scored; the answer is last in every template, so it is always scored.
    """
    try:
        encoding = tokenizer(sentence.text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise KAError("answer spans need a fast tokenizer (offset mapping): load it with use_fast=True") from err
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    in_answer = torch.tensor(
        [start < sentence.answer_end and end > sentence.answer_start for start, end in encoding["offset_mapping"]],
        dtype=torch.bool,
    )
    answer_labels = torch.where(in_answer, input_ids, torch.full_like(input_ids, -100))
    return input_ids, input_ids.clone(), answer_labels
