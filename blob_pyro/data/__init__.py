"""Data: BIG-bench, paper (hub) and tabular tasks, stratified splits, prompts and token batches."""

from blob_pyro.data.bigbench import load_bigbench
from blob_pyro.data.encoding import (
    EncodedSplit,
    answer_token_ids,
    encode_multiple_choice,
    encode_text_classification,
    iterate_batches,
)
from blob_pyro.data.examples import SPLIT_ROLES, MultipleChoiceExample, MultipleChoiceTask
from blob_pyro.data.paper_tasks import PAPER_TASKS, PaperTask, load_paper_task, paper_task
from blob_pyro.data.prompts import (
    ANSWER_LETTERS,
    DEFAULT_FORMAT,
    PromptFormat,
    answer_label_strings,
    choice_likelihood_prompt,
    choices_block,
    classification_text,
    format_prompt,
)
from blob_pyro.data.splits import Split, carve_calibration, load_split_file, stratified_sample, stratified_split
from blob_pyro.data.tabular import ColumnMapping, load_tabular
from blob_pyro.data.task_spec import load_task_spec, task_spec_name

__all__ = [
    "ANSWER_LETTERS",
    "ColumnMapping",
    "PAPER_TASKS",
    "PaperTask",
    "SPLIT_ROLES",
    "EncodedSplit",
    "MultipleChoiceExample",
    "MultipleChoiceTask",
    "Split",
    "answer_label_strings",
    "answer_token_ids",
    "carve_calibration",
    "choices_block",
    "classification_text",
    "encode_multiple_choice",
    "encode_text_classification",
    "format_prompt",
    "PromptFormat",
    "DEFAULT_FORMAT",
    "choice_likelihood_prompt",
    "iterate_batches",
    "load_bigbench",
    "load_paper_task",
    "load_split_file",
    "load_tabular",
    "load_task_spec",
    "paper_task",
    "stratified_sample",
    "stratified_split",
    "task_spec_name",
]
