"""Data: BIG-bench multiple-choice tasks, stratified splits, prompts and token batches."""

from blob_pyro.data.bigbench import load_bigbench
from blob_pyro.data.encoding import (
    EncodedSplit,
    answer_token_ids,
    encode_multiple_choice,
    encode_text_classification,
    iterate_batches,
)
from blob_pyro.data.examples import MultipleChoiceExample, MultipleChoiceTask
from blob_pyro.data.prompts import (
    ANSWER_LETTERS,
    answer_label_strings,
    choices_block,
    classification_text,
    format_prompt,
)
from blob_pyro.data.splits import Split, load_split_file, stratified_split

__all__ = [
    "ANSWER_LETTERS",
    "EncodedSplit",
    "MultipleChoiceExample",
    "MultipleChoiceTask",
    "Split",
    "answer_label_strings",
    "answer_token_ids",
    "choices_block",
    "classification_text",
    "encode_multiple_choice",
    "encode_text_classification",
    "format_prompt",
    "iterate_batches",
    "load_bigbench",
    "load_split_file",
    "stratified_split",
]
