import pytest

from llava_circuits.metrics.chair import (
    COCO_VOCABULARY, ChairMetric, extract_mentions, extract_objects, object_vocabulary, plural,
)


def test_coco_table_covers_the_80_categories():
    assert len({obj for obj in COCO_VOCABULARY.values() if obj}) == 80


@pytest.mark.parametrize(
    "text, objects",
    [
        ("Two men ride motor bikes past a fire hydrant.", ["person", "motorcycle", "fire hydrant"]),
        ("Hot dogs and a teddy bear.", ["hot dog", "teddy bear"]),  # not dog, not bear
        ("A baby elephant near the train tracks.", ["elephant"]),  # not person, not train
        ("Wine glasses on dining tables, a puppy and three sheep.", ["wine glass", "dining table", "dog", "sheep"]),
        ("A dog, another dog.", ["dog", "dog"]),
    ],
)
def test_extract_objects_coco(text, objects):
    assert extract_objects(text, COCO_VOCABULARY) == objects


def test_plurals():
    assert [plural(w) for w in ("bus", "pony", "knife", "woman", "sheep", "box", "toy")] == [
        "buses", "ponies", "knives", "women", "sheep", "boxes", "toys"]


def test_hand_computed_coco():
    m = ChairMetric()
    m.update(
        ["A man and a dog on a couch with a cat.", "A dog and a dog.", "A sunny day."],
        [{"person", "dog", "couch"}, {"dog", "cat"}, {"car"}],
    )
    # caption 0: 4 mentions, cat hallucinated; caption 1: 2 mentions, none; caption 2: none
    assert m.compute() == {"chair_s": 1 / 3, "chair_i": 1 / 6, "recall": (3 + 1 + 0) / (3 + 2 + 1)}


def test_toilet_seat_is_not_a_chair():
    m = ChairMetric()
    assert m.objects("The seat of the toilet is up.") == ["toilet"]
    assert m.objects("A seat by the window.") == ["chair"]
    m.update(["The seat of the toilet is up."], [{"toilet"}])
    assert m.compute()["chair_i"] == 0.0
    assert ChairMetric(vocabulary=COCO_VOCABULARY).objects("The seat of the toilet is up.") == ["toilet"]  # same table


def test_verbs_and_food_are_not_people():
    assert ChairMetric().objects("A woman cooks dinner while a man stirs the cake batter.") == ["person", "person", "cake"]


def test_references_join_ground_truth():
    m = ChairMetric()
    m.update(["A cat on a bed."], [{"bed"}], references=[["A kitten sleeping on a bed."]])
    assert m.compute() == {"chair_s": 0.0, "chair_i": 0.0, "recall": 1.0}


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # computing before any update
def test_custom_vocabulary_and_empty():
    vocab = {**object_vocabulary(["red cube", "ball"]), "sphere": "ball", "cube shadow": None}
    assert extract_mentions("Two red cubes, a sphere and a cube shadow.", vocab) == [
        ("red cubes", "red cube"), ("sphere", "ball")]
    m = ChairMetric(vocabulary=vocab)
    assert m.compute() == {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0}
    m.update(["A sphere."], [{"red cube"}])
    assert m.compute() == {"chair_s": 1.0, "chair_i": 1.0, "recall": 0.0}
