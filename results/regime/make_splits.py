"""Write the regime study's split files: 400 validation, 64 calibration and 576 training examples per task.

The 640 examples of the usual 640 / 400 split (``stratified_split(seed=0)``, the procedure every run of this
repository uses) are divided once more: a seeded stratified sample of 64 becomes the calibration split
(temperature scaling is fitted there, never on validation), the other 576 are the training set of EVERY
method of the study, so no method trains on the calibration examples. Indices are positions in the task
file. Run from the repository root: ``python results/regime/make_splits.py``.
"""

import json
from pathlib import Path

from blob_pyro.assembly import load_task
from blob_pyro.config import TrainConfig
from blob_pyro.data.splits import stratified_sample, stratified_split

TASKS = {
    "social_iqa": "bundled:social_iqa",
    "epistemic_reasoning": "../shared/data/bigbench/epistemic_reasoning.json",
    "fact_checker": "../shared/data/bigbench/fact_checker__fever.json",
}
NUM_TRAIN, NUM_VALIDATION, NUM_CALIBRATION, SEED = 640, 400, 64, 0

for name, spec in TASKS.items():
    task = load_task(TrainConfig(task=spec))
    split = stratified_split(task.labels, num_train=NUM_TRAIN, num_validation=NUM_VALIDATION, seed=SEED)
    labels = [task.labels[p] for p in split.train]
    picked = set(stratified_sample(labels, size=NUM_CALIBRATION, seed=SEED + 1))
    calibration = [split.train[i] for i in sorted(picked)]
    train = [p for i, p in enumerate(split.train) if i not in picked]
    to_file = (lambda ps: [int(task.file_indices[p]) for p in ps]) if task.file_indices is not None else (lambda ps: [int(p) for p in ps])
    out = {
        "task": spec, "seed": SEED,
        "procedure": (f"stratified_split(seed={SEED}) of {NUM_TRAIN} train and {NUM_VALIDATION} validation examples; "
                      f"then stratified_sample(seed={SEED + 1}) of {NUM_CALIBRATION} of the {NUM_TRAIN} train positions "
                      f"as 'calibration', the other {NUM_TRAIN - NUM_CALIBRATION} (in the stratified_split order) as 'train'; "
                      "indices are positions in the task file"),
        "train": to_file(train), "calibration": to_file(calibration), "validation": to_file(split.validation),
    }
    assert not set(out["train"]) & set(out["calibration"]) and not set(out["validation"]) & (set(out["train"]) | set(out["calibration"]))
    path = Path(__file__).parent / f"split_{name}_576_64_400.json"
    path.write_text(json.dumps(out) + "\n")
    print(f"{path}: train {len(train)}, calibration {len(calibration)}, validation {len(split.validation)}, classes {task.num_choices}")
