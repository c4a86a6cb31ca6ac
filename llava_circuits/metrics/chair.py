"""CHAIR (Rohrbach et al. 2018): object hallucination in captions, by vocabulary matching.

A *vocabulary* maps a lower-case word or phrase to the canonical object it mentions, or to None for
phrases that must be consumed without naming an object ("train track", "ski pole"). Mentions are found
by greedy longest-phrase matching over the lower-cased words of a caption. `COCO_VOCABULARY` is our own
table for the 80 COCO categories (synonyms, plurals, multi-word names); `object_vocabulary` builds one
for any other object set (the toy world, AMBER annotations).
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

import torch
from torchmetrics import Metric

from llava_circuits.metrics.counting import ratio

Vocabulary = Mapping[str, "str | None"]

IRREGULAR_PLURALS = {
    "person": "persons", "child": "children", "mouse": "mice", "goose": "geese", "ox": "oxen",
    "knife": "knives", "calf": "calves", "sheep": "sheep", "aircraft": "aircraft", "cattle": "cattle",
    "luggage": "luggage", "broccoli": "broccoli", "skis": "skis", "scissors": "scissors",
}


def plural(word: str) -> str:
    """English plural of a (last) word: regular rules plus a few irregular nouns."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith("man"):
        return word[:-3] + "men"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


def with_plurals(vocabulary: Vocabulary) -> dict[str, str | None]:
    """The vocabulary plus the plural of every phrase (last word pluralised); explicit entries win."""
    out: dict[str, str | None] = {}
    for phrase, obj in vocabulary.items():
        *head, last = phrase.split(" ")
        out.setdefault(" ".join([*head, plural(last)]), obj)
    out.update(vocabulary)
    return out


def object_vocabulary(objects: Iterable[str]) -> dict[str, str | None]:
    """A vocabulary in which each object (and its plural) names itself."""
    return with_plurals({obj.lower(): obj for obj in objects})


def extract_mentions(text: str, vocabulary: Vocabulary) -> list[tuple[str, str]]:
    """(phrase, canonical object) for every object mention in `text`, in order; longest phrase wins."""
    words = re.findall(r"[a-z]+", text.lower())
    longest = max((len(p.split(" ")) for p in vocabulary), default=1)
    found, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + n])
            if phrase in vocabulary:
                if vocabulary[phrase] is not None:
                    found.append((phrase, vocabulary[phrase]))
                i += n
                break
        else:
            i += 1
    return found


def extract_objects(text: str, vocabulary: Vocabulary) -> list[str]:
    """Canonical objects mentioned in `text`, in order, repeats kept."""
    return [obj for _, obj in extract_mentions(text, vocabulary)]


_COCO_SYNONYMS = {  # canonical COCO category -> words and phrases that name it (singular forms)
    "person": "person people man woman boy girl child kid baby toddler adult teenager guy lady "
    "gentleman player skier snowboarder surfer skateboarder skater rider biker cyclist pedestrian "
    "worker chef officer policeman soldier student tourist passenger driver spectator mother "
    "father bride groom catcher pitcher umpire athlete farmer cowboy vendor customer",  # no "cook", "batter": in captions mostly a verb, a food
    "bicycle": "bicycle bike tricycle unicycle",
    "car": "car automobile sedan suv taxi cab van minivan jeep hatchback limo limousine coupe",
    "motorcycle": "motorcycle motorbike scooter moped|motor bike|motor cycle|dirt bike",
    "airplane": "airplane aeroplane plane jet jetliner airliner aircraft biplane seaplane"
    "|air plane|passenger jet|passenger plane",
    "bus": "bus minibus|double decker",
    "train": "train locomotive tram|passenger train",
    "truck": "truck lorry pickup firetruck|fire truck|pickup truck",
    "boat": "boat ship sailboat yacht canoe kayak ferry speedboat motorboat rowboat barge tugboat catamaran",
    "traffic light": "stoplight|traffic light|traffic signal|stop light",
    "fire hydrant": "hydrant|fire hydrant",
    "stop sign": "|stop sign",
    "parking meter": "|parking meter",
    "bench": "bench pew",
    "bird": "bird pigeon seagull gull duck goose swan parrot owl eagle hawk crow sparrow pelican "
    "flamingo rooster heron penguin",
    "cat": "cat kitten kitty",
    "dog": "dog puppy pup doggy doggie terrier retriever poodle labrador bulldog beagle husky "
    "sheepdog dachshund chihuahua pug",
    "horse": "horse pony foal stallion mare colt",
    "sheep": "sheep lamb ram ewe",
    "cow": "cow cattle calf bull ox heifer",
    "elephant": "elephant",
    "bear": "bear panda grizzly|polar bear",
    "zebra": "zebra",
    "giraffe": "giraffe",
    "backpack": "backpack knapsack rucksack",
    "umbrella": "umbrella parasol",
    "handbag": "handbag purse pocketbook",
    "tie": "tie necktie|bow tie",
    "suitcase": "suitcase luggage|suit case",
    "frisbee": "frisbee|flying disc",
    "skis": "ski skis",
    "snowboard": "snowboard",
    "sports ball": "ball|sports ball",
    "kite": "kite",
    "baseball bat": "bat|baseball bat",
    "baseball glove": "mitt|baseball glove|baseball mitt",
    "skateboard": "skateboard|skate board",
    "surfboard": "surfboard|surf board",
    "tennis racket": "racket racquet|tennis racket|tennis racquet",
    "bottle": "bottle",
    "wine glass": "wineglass|wine glass",
    "cup": "cup mug teacup",
    "fork": "fork",
    "knife": "knife",
    "spoon": "spoon",
    "bowl": "bowl",
    "banana": "banana",
    "apple": "apple",
    "sandwich": "sandwich burger hamburger cheeseburger sub",
    "orange": "orange",
    "broccoli": "broccoli",
    "carrot": "carrot",
    "hot dog": "hotdog|hot dog",
    "pizza": "pizza",
    "donut": "donut doughnut",
    "cake": "cake cupcake cheesecake",
    "chair": "chair stool armchair seat|high chair",
    "couch": "couch sofa loveseat futon",
    "potted plant": "houseplant planter|potted plant|house plant|flower pot",
    "bed": "bed",
    "dining table": "table desk|dining table",
    "toilet": "toilet urinal|toilet seat",
    "tv": "tv television monitor",
    "laptop": "laptop computer|laptop computer",
    "mouse": "mouse|computer mouse",
    "remote": "remote|remote control",
    "keyboard": "keyboard",
    "cell phone": "cellphone phone smartphone telephone|cell phone|mobile phone",
    "microwave": "microwave",
    "oven": "oven stove stovetop",
    "toaster": "toaster",
    "sink": "sink",
    "refrigerator": "refrigerator fridge freezer",
    "book": "book",
    "clock": "clock",
    "vase": "vase",
    "scissors": "scissors scissor",
    "teddy bear": "teddy|teddy bear",
    "hair drier": "hairdryer|hair drier|hair dryer|blow dryer",
    "toothbrush": "toothbrush|tooth brush",
}
_COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
_COCO_NOT_OBJECTS = ("train track", "train station", "ski pole", "ski lift", "ski slope", "home plate", "car seat")


def _coco_vocabulary() -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    for obj, spec in _COCO_SYNONYMS.items():
        words, *phrases = spec.split("|")
        for phrase in [*words.split(), *phrases]:
            table[phrase] = obj
    for animal in _COCO_ANIMALS:  # "baby elephant" is an elephant, not a person
        table[f"baby {animal}"] = table[f"adult {animal}"] = animal
    table.update(dict.fromkeys(_COCO_NOT_OBJECTS))
    return with_plurals(table)


COCO_VOCABULARY: dict[str, str | None] = _coco_vocabulary()


class ChairMetric(Metric):
    """chair_s, chair_i and recall of generated captions against ground-truth object sets.

    chair_s: fraction of captions with at least one hallucinated object. chair_i: hallucinated
    mentions / all object mentions, repeats counted (as Rohrbach et al.'s chair.py). recall: ground-truth
    objects mentioned (distinct, per caption) / ground-truth objects, summed over captions (the "Recall"
    of the widely used CHAIR-metric-standalone/OPERA versions). Empty denominators give 0.0.
    Differences from chair.py: no NLTK tokenisation or singularisation (plurals are vocabulary entries)
    and the COCO synonym table is ours; the "seat next to a toilet is not a chair" rule is kept.
    """

    full_state_update = False

    def __init__(self, vocabulary: Vocabulary | None = None, **kwargs) -> None:
        """vocabulary: phrase -> canonical object (None: not an object); default `COCO_VOCABULARY`."""
        super().__init__(**kwargs)
        self.vocabulary = COCO_VOCABULARY if vocabulary is None else dict(vocabulary)
        self._coco = vocabulary is None or vocabulary is COCO_VOCABULARY  # the toilet-seat rule is the COCO table's
        for name in ("captions", "hallucinated_captions", "mentions", "hallucinated_mentions", "gt", "gt_covered"):
            self.add_state(f"n_{name}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def objects(self, caption: str) -> list[str]:
        """Objects mentioned in a caption. With the COCO table, as in chair.py, a caption that names
        a toilet loses its "seat" mentions (the seat of a toilet is not a chair)."""
        found = extract_mentions(caption, self.vocabulary)
        if self._coco and any(obj == "toilet" for _, obj in found):
            found = [(p, obj) for p, obj in found if p not in ("seat", "seats")]
        return [obj for _, obj in found]

    def update(
        self,
        captions: Sequence[str],
        gt_objects: Sequence[Collection[str]],
        references: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """captions: generated text per image; gt_objects: the image's ground-truth objects (canonical
        names, or vocabulary words mapped to them); references: optional human captions per image whose
        mentioned objects join the ground truth, as chair.py does with the COCO reference captions."""
        references = references if references is not None else [()] * len(captions)
        if not len(captions) == len(gt_objects) == len(references):
            raise ValueError(f"got {len(captions)} captions, {len(gt_objects)} ground-truth sets, "
                             f"{len(references)} reference lists")
        for caption, gt_raw, refs in zip(captions, gt_objects, references):
            gt = {self.vocabulary.get(o.lower()) or o for o in gt_raw}
            gt.update(o for ref in refs for o in self.objects(ref))
            found = self.objects(caption)
            wrong = sum(o not in gt for o in found)
            self.n_captions += 1
            self.n_hallucinated_captions += int(wrong > 0)
            self.n_mentions += len(found)
            self.n_hallucinated_mentions += wrong
            self.n_gt += len(gt)
            self.n_gt_covered += len(gt & set(found))

    def compute(self) -> dict[str, float]:
        return {
            "chair_s": ratio(self.n_hallucinated_captions, self.n_captions),
            "chair_i": ratio(self.n_hallucinated_mentions, self.n_mentions),
            "recall": ratio(self.n_gt_covered, self.n_gt),
        }

