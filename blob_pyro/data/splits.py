"""Seeded, stratified train/validation splits, recorded as index lists.

BIG-bench tasks ship without a train/test split, so every run makes (or reads) one and records it
in its run directory with :meth:`Split.to_dict`. A calibration split for post-hoc methods (temperature
scaling) is carved out of the training examples by :func:`carve_calibration`, never out of validation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STRATIFIED_PROCEDURE = (
    "numpy.random.default_rng({seed}); per class k in sorted order permute that class's indices and take a "
    "proportional share (largest remainder) for train ({num_train}) then validation ({num_validation}); "
    "finally permute train, then validation, with the same generator."
)


@dataclass(frozen=True)
class Split:
    """Disjoint train, validation and (optional) calibration index lists.

    Attributes:
        train: Indices of the training examples, in training order.
        validation: Indices of the validation examples.
        seed: Seed of the generator that made the split.
        procedure: Human-readable description of how the split was made.
        calibration: Indices of held-out training examples for post-hoc calibration (empty: none).
    """

    train: list[int]
    validation: list[int]
    seed: int
    procedure: str
    calibration: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for first, second in (("train", "validation"), ("calibration", "train"), ("calibration", "validation")):
            overlap = set(getattr(self, first)) & set(getattr(self, second))
            if overlap:
                raise ValueError(
                    f"{first} and {second} share {len(overlap)} indices (e.g. {sorted(overlap)[:5]}); a split must be disjoint."
                )
        for name in ("train", "validation", "calibration"):
            indices = getattr(self, name)
            if len(set(indices)) != len(indices):
                raise ValueError(f"Split.{name} contains repeated indices; each example may appear once.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record: ``train``, ``validation``, ``calibration``, ``seed``, ``procedure`` and the sizes."""
        return {
            "seed": int(self.seed),
            "procedure": self.procedure,
            "num_train": len(self.train),
            "num_validation": len(self.validation),
            "num_calibration": len(self.calibration),
            "train": [int(i) for i in self.train],
            "validation": [int(i) for i in self.validation],
            "calibration": [int(i) for i in self.calibration],
        }

    def remap(self, mapping: Sequence[int] | Mapping[int, int]) -> Split:
        """The same split with every index ``i`` replaced by ``mapping[i]``.

        E.g. ``split.remap(task.file_indices)`` turns positions in a task's example list into
        positions in its source file.
        """
        try:
            return Split(
                train=[int(mapping[i]) for i in self.train],
                validation=[int(mapping[i]) for i in self.validation],
                seed=self.seed,
                procedure=self.procedure,
                calibration=[int(mapping[i]) for i in self.calibration],
            )
        except (KeyError, IndexError) as error:
            raise ValueError(f"Split index {error} has no entry in the mapping.") from error


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``counts`` (Hamilton's method; ties to lower class)."""
    exact = counts * total / counts.sum()
    shares = np.floor(exact).astype(int)
    remainders = exact - shares
    order = sorted(range(len(counts)), key=lambda k: (-remainders[k], k))
    for k in order[: total - int(shares.sum())]:
        shares[k] += 1
    return shares


def stratified_split(labels: Sequence[int], *, num_train: int, num_validation: int, seed: int) -> Split:
    """Split positions ``0..len(labels)-1`` into train and validation, stratified by label.

    Procedure (reproduces ``shared/data/splits/social_iqa_640_400_seed0.json``):
    ``rng = numpy.random.default_rng(seed)``; for each class ``k`` in sorted order, permute the
    class's positions with ``rng`` and take the first ``n_train[k]`` for train and the next
    ``n_val[k]`` for validation, where ``n_train``/``n_val`` are shares of ``num_train``/
    ``num_validation`` proportional to the class sizes (largest remainder); finally permute the
    train list, then the validation list, with the same ``rng``.

    Args:
        labels: Class of every example, shape ``(n,)``.
        num_train: Size of the training split.
        num_validation: Size of the validation split.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        A :class:`Split` of positions into ``labels``.
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    n = len(labels_array)
    if num_train < 1 or num_validation < 1:
        raise ValueError(
            f"num_train={num_train} and num_validation={num_validation} would leave a split empty; both must be >= 1."
        )
    if num_train + num_validation > n:
        raise ValueError(
            f"num_train + num_validation = {num_train + num_validation} exceeds the {n} available examples; "
            "reduce num_train or num_validation."
        )
    classes, counts = np.unique(labels_array, return_counts=True)
    train_shares = _largest_remainder(counts, num_train)
    validation_shares = _largest_remainder(counts, num_validation)
    for k, count, n_train, n_val in zip(classes, counts, train_shares, validation_shares):
        if n_train < 1 or n_val < 1 or n_train + n_val > count:
            raise ValueError(
                f"Class {int(k)} has {int(count)} examples, too few for its proportional share of "
                f"{int(n_train)} train and {int(n_val)} validation examples (each split needs at least one of "
                "every class). Change num_train/num_validation or drop the rare class."
            )

    rng = np.random.default_rng(seed)
    train: list[int] = []
    validation: list[int] = []
    for k, n_train, n_val in zip(classes, train_shares, validation_shares):
        permuted = rng.permutation(np.flatnonzero(labels_array == k))
        train.extend(permuted[:n_train].tolist())
        validation.extend(permuted[n_train : n_train + n_val].tolist())
    return Split(
        train=rng.permutation(train).tolist(),
        validation=rng.permutation(validation).tolist(),
        seed=seed,
        procedure=STRATIFIED_PROCEDURE.format(seed=seed, num_train=num_train, num_validation=num_validation),
    )


def _seed_of(data: Mapping[str, Any], path: Path) -> int:
    if "seed" in data:
        return int(data["seed"])
    for text in (str(data.get("procedure", "")), path.name):
        match = re.search(r"default_rng\((\d+)\)", text) or re.search(r"seed(\d+)", text)
        if match:
            return int(match.group(1))
    raise ValueError(
        f"{path}: no 'seed' field and no seed in 'procedure' (default_rng(N)) or the file name (seedN); "
        "add a 'seed' field."
    )


def load_split_file(path: str | os.PathLike[str], *, file_indices: Sequence[int] | None = None) -> Split:
    """Read a recorded split (keys ``train``, ``validation``, ``procedure``; optional ``seed``, ``calibration``).

    Args:
        path: JSON file, e.g. ``shared/data/splits/social_iqa_640_400_seed0.json``.
        file_indices: If given (``task.file_indices``), the file's indices are taken as positions in
            the source file and converted to positions in the task's example list; an index whose
            example the loader dropped is an error.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected a split file.") from error
    missing = [key for key in ("train", "validation", "procedure") if key not in data]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}; a split file needs 'train' and 'validation' index lists and a 'procedure' text."
        )
    split = Split(
        train=[int(i) for i in data["train"]],
        validation=[int(i) for i in data["validation"]],
        seed=_seed_of(data, path),
        procedure=str(data["procedure"]),
        calibration=[int(i) for i in data.get("calibration", [])],
    )
    if file_indices is None:
        return split
    position = {int(file_index): i for i, file_index in enumerate(file_indices)}
    return split.remap(position)


def stratified_sample(labels: Sequence[int], *, size: int, seed: int) -> list[int]:
    """A seeded sample of ``size`` positions of ``labels`` with class shares proportional to the class sizes.

    Used to evaluate on a fixed subset of a task (``--eval-task-size``). Procedure:
    ``rng = numpy.random.default_rng(seed)``; shares by largest remainder (a rare class may get none);
    per class in sorted order, the first ``share`` positions of a permutation; the result sorted.
    ``size >= len(labels)`` returns every position.
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    if size < 1:
        raise ValueError(f"size must be >= 1, found {size}.")
    if size >= len(labels_array):
        return list(range(len(labels_array)))
    classes, counts = np.unique(labels_array, return_counts=True)
    shares = _largest_remainder(counts, size)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for k, share in zip(classes, shares):
        chosen.extend(rng.permutation(np.flatnonzero(labels_array == k))[:share].tolist())
    return sorted(int(i) for i in chosen)


CALIBRATION_PROCEDURE = (
    "; calibration: stratified_sample(seed={seed}) of {size} of the training examples, removed from train "
    "(the remaining training order kept)"
)


def carve_calibration(split: Split, labels: Sequence[int], *, size: int, seed: int) -> Split:
    """``split`` with ``size`` of its training examples moved to ``calibration``.

    The calibration examples are :func:`stratified_sample` ``(seed=seed)`` of the training positions'
    labels, so class shares follow the training split's; train keeps its order minus those examples;
    validation is untouched (a run with and without calibration is evaluated on the same examples).

    Args:
        split: A split without calibration examples.
        labels: Class of every example of the task, shape ``(n,)`` (``split`` indexes it).
        size: Number of calibration examples, ``1 <= size < len(split.train)``.
        seed: Seed of the sample (runs use ``--split-seed``).
    """
    if split.calibration:
        raise ValueError(
            f"the split already has {len(split.calibration)} calibration examples; carve calibration once"
        )
    if not 1 <= size < len(split.train):
        raise ValueError(
            f"cannot carve {size} calibration examples out of {len(split.train)} training examples: "
            f"it needs 1 <= num_calibration < the training split's size; lower --num-calibration or raise --num-train."
        )
    train_labels = [labels[i] for i in split.train]
    chosen = stratified_sample(train_labels, size=size, seed=seed)
    calibration = [split.train[i] for i in chosen]
    taken = set(calibration)
    return Split(
        train=[i for i in split.train if i not in taken],
        validation=list(split.validation),
        seed=split.seed,
        procedure=split.procedure + CALIBRATION_PROCEDURE.format(seed=seed, size=size),
        calibration=calibration,
    )
