"""Stratified splits: reproduction of the shared split file, proportions, determinism, errors."""

import json
from collections import Counter

import pytest

from blob_pyro.data import Split, load_bigbench, load_split_file, stratified_split

from tests.conftest import BIGBENCH_DIR, SHARED_DIR as SHARED

SPLIT_FILE = SHARED / "data" / "splits" / "social_iqa_640_400_seed0.json"
SOCIAL_IQA = BIGBENCH_DIR / "social_iqa.json"


@pytest.mark.skipif(not (SPLIT_FILE.is_file() and SOCIAL_IQA.is_file()), reason=f"shared data not found under {SHARED}")
def test_reproduces_shared_social_iqa_split_exactly():
    task = load_bigbench(SOCIAL_IQA, drop_mismatched_choices=True)
    recorded = load_split_file(SPLIT_FILE)
    assert recorded.seed == 0
    # The procedure ran over the 1950 kept examples; the file lists their indices in the file.
    made = stratified_split(task.labels, num_train=640, num_validation=400, seed=0)
    in_file = made.remap(task.file_indices)
    assert in_file.train == recorded.train
    assert in_file.validation == recorded.validation
    # ... and reading the file with file_indices gives positions in task.examples directly.
    positions = load_split_file(SPLIT_FILE, file_indices=task.file_indices)
    assert positions.train == made.train and positions.validation == made.validation
    counts = json.loads(SPLIT_FILE.read_text())
    assert Counter(task.labels[i] for i in made.train) == {int(k): v for k, v in counts["counts_train"].items()}
    assert Counter(task.labels[i] for i in made.validation) == {int(k): v for k, v in counts["counts_val"].items()}


def test_stratification_proportions():
    labels = [0] * 500 + [1] * 300 + [2] * 200
    split = stratified_split(labels, num_train=100, num_validation=50, seed=3)
    assert Counter(labels[i] for i in split.train) == {0: 50, 1: 30, 2: 20}
    assert Counter(labels[i] for i in split.validation) == {0: 25, 1: 15, 2: 10}
    assert not set(split.train) & set(split.validation)


def test_largest_remainder_shares_sum_exactly():
    labels = [0] * 7 + [1] * 7 + [2] * 7  # 10 / 3 per class: remainders tie, lowest class wins
    split = stratified_split(labels, num_train=10, num_validation=5, seed=0)
    assert Counter(labels[i] for i in split.train) == {0: 4, 1: 3, 2: 3}
    assert Counter(labels[i] for i in split.validation) == {0: 2, 1: 2, 2: 1}


def test_split_is_deterministic_in_the_seed():
    labels = [i % 3 for i in range(90)]
    first = stratified_split(labels, num_train=30, num_validation=15, seed=7)
    assert first == stratified_split(labels, num_train=30, num_validation=15, seed=7)
    other = stratified_split(labels, num_train=30, num_validation=15, seed=8)
    assert other.train != first.train


def test_to_dict_is_json_and_round_trips(tmp_path):
    split = stratified_split([0, 1] * 10, num_train=6, num_validation=4, seed=1)
    record = split.to_dict()
    path = tmp_path / "split.json"
    path.write_text(json.dumps(record))
    assert load_split_file(path) == split
    assert record["num_train"] == 6 and "default_rng(1)" in record["procedure"]


@pytest.mark.parametrize(
    ("labels", "num_train", "num_validation", "match"),
    [
        ([0, 1] * 5, 8, 4, r"num_train \+ num_validation = 12 exceeds the 10 available"),
        ([0, 1] * 5, 4, 0, r"would leave a split empty"),
        ([0, 1] * 5, 0, 4, r"would leave a split empty"),
        ([0] * 20 + [1], 5, 5, r"Class 1 has 1 examples, too few"),
    ],
)
def test_split_errors(labels, num_train, num_validation, match):
    with pytest.raises(ValueError, match=match):
        stratified_split(labels, num_train=num_train, num_validation=num_validation, seed=0)


def test_split_must_be_disjoint():
    with pytest.raises(ValueError, match=r"share 1 indices"):
        Split(train=[1, 2], validation=[2, 3], seed=0, procedure="hand-made")


def test_load_split_file_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": [0]}))
    with pytest.raises(ValueError, match=r"lacks \['validation', 'procedure'\]"):
        load_split_file(path)
    path.write_text(json.dumps({"train": [0, 5], "validation": [1], "procedure": "p", "seed": 0}))
    with pytest.raises(ValueError, match=r"Split index 5 has no entry"):
        load_split_file(path, file_indices=[0, 1, 2])
