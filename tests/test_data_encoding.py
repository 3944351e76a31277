"""Prompts, tokenization with left truncation, answer-label tokens and padded batches."""

import pytest
import torch

from blob_pyro.data import (
    ANSWER_LETTERS,
    EncodedSplit,
    MultipleChoiceExample,
    answer_label_strings,
    answer_token_ids,
    classification_text,
    encode_multiple_choice,
    encode_text_classification,
    format_prompt,
    iterate_batches,
)

EXAMPLE = MultipleChoiceExample(
    question="  Tracy didn't go home. What does Tracy need to do before this? ",
    choices=("Make a new plan", "Go home and see Riley", "Find somewhere to go"),
    label=2,
)


def test_format_prompt_exact():
    assert format_prompt(EXAMPLE, task_prefix="Answer the question.\n") == (
        "Answer the question.\n"
        "Tracy didn't go home. What does Tracy need to do before this?\n"
        "A. Make a new plan\n"
        "B. Go home and see Riley\n"
        "C. Find somewhere to go\n"
        "Answer:"
    )


def test_format_prompt_without_letters_and_classification_text():
    assert format_prompt(EXAMPLE, letters=False).splitlines()[1:] == [*EXAMPLE.choices, "Answer:"]
    assert classification_text(EXAMPLE, task_prefix="P: ") == "P: Tracy didn't go home. What does Tracy need to do before this?"


def test_answer_label_strings():
    assert answer_label_strings(3) == [" A", " B", " C"]
    assert len(answer_label_strings(len(ANSWER_LETTERS))) == 10
    with pytest.raises(ValueError, match=r"support 1 to 10 choices"):
        answer_label_strings(11)


def test_encoding_matches_tokenizer_on_short_prompts(tiny_bpe_tokenizer):
    encoded = encode_multiple_choice([EXAMPLE], tiny_bpe_tokenizer, task_prefix="Q: ")
    assert encoded.input_ids[0] == tiny_bpe_tokenizer(format_prompt(EXAMPLE, task_prefix="Q: "))["input_ids"]
    assert encoded.labels.tolist() == [2] and encoded.labels.dtype == torch.long and len(encoded) == 1


def test_left_truncation_keeps_prefix_choices_and_answer_tail(tiny_bpe_tokenizer):
    long_example = MultipleChoiceExample(
        question="Riley went out. " * 40 + "What does Tracy need to do before this?", choices=EXAMPLE.choices, label=0
    )
    full = tiny_bpe_tokenizer(format_prompt(long_example, task_prefix="Q: "))["input_ids"]
    max_length = 60
    assert len(full) > max_length
    ids = encode_multiple_choice([long_example], tiny_bpe_tokenizer, task_prefix="Q: ", max_length=max_length).input_ids[0]
    assert len(ids) == max_length
    text = tiny_bpe_tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("Q: ")
    assert text.endswith("need to do before this?\nA. Make a new plan\nB. Go home and see Riley\nC. Find somewhere to go\nAnswer:")
    assert "Riley went out. " * 40 not in text  # the start of the context was cut
    assert ids[0] == tiny_bpe_tokenizer.bos_token_id


def test_left_truncation_keeps_trailing_special_tokens(byte_tokenizer):
    long_example = MultipleChoiceExample(question="x" * 200 + "END?", choices=("yes", "no"), label=1)
    ids = encode_multiple_choice([long_example], byte_tokenizer, max_length=40).input_ids[0]
    assert len(ids) == 40 and ids[-1] == byte_tokenizer.eos_token_id
    assert byte_tokenizer.decode(ids, skip_special_tokens=True).endswith("END?\nA. yes\nB. no\nAnswer:")


def test_choices_block_too_long_is_an_error(tiny_bpe_tokenizer):
    with pytest.raises(ValueError, match=r"Example 0: the task prefix and choices block alone take \d+ tokens.*max_length=10"):
        encode_multiple_choice([EXAMPLE], tiny_bpe_tokenizer, max_length=10)


def test_answer_token_ids_single_tokens(tiny_bpe_tokenizer):
    ids = answer_token_ids(tiny_bpe_tokenizer, 4)
    assert len(set(ids)) == 4
    assert [tiny_bpe_tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]


def test_answer_token_ids_fail_on_multi_token_labels(byte_tokenizer):
    with pytest.raises(ValueError, match=r"Answer label ' A' is 2 tokens.*expected exactly one"):
        answer_token_ids(byte_tokenizer, 2)


def test_encode_text_classification_truncates(tiny_bpe_tokenizer):
    encoded = encode_text_classification(["short text", "Riley went out. " * 50], [0, 1], tiny_bpe_tokenizer, max_length=16)
    assert len(encoded.input_ids[1]) == 16 and encoded.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"2 texts but 1 labels"):
        encode_text_classification(["a", "b"], [0], tiny_bpe_tokenizer)


ENCODED = EncodedSplit(input_ids=[[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]], labels=torch.tensor([0, 1, 2, 0, 1]))


def test_left_padding_and_masks():
    batch = next(iterate_batches(ENCODED, batch_size=3, pad_token_id=0, shuffle=False))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["labels"].tolist() == [0, 1, 2] and batch["indices"].tolist() == [0, 1, 2]
    assert all(t.dtype == torch.long for t in batch.values())


def test_right_padding_and_dynamic_width():
    batches = list(iterate_batches(ENCODED, batch_size=3, pad_token_id=-1, shuffle=False, padding_side="right"))
    assert batches[1]["input_ids"].tolist() == [[11, 12, 13, 14], [15, -1, -1, -1]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_shuffle_is_seeded_and_covers_everything():
    def order(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        batches = iterate_batches(ENCODED, batch_size=2, pad_token_id=0, shuffle=True, generator=generator, **kwargs)
        return [i for batch in batches for i in batch["indices"].tolist()]

    assert sorted(order(0)) == list(range(5)) and order(0) == order(0)
    assert len(order(0, drop_last=True)) == 4
    for batch in iterate_batches(ENCODED, batch_size=2, pad_token_id=0, shuffle=True, generator=torch.Generator().manual_seed(1)):
        assert batch["labels"].tolist() == ENCODED.labels[batch["indices"]].tolist()


def test_encode_text_classification_cuts_the_context_from_the_left(tiny_bpe_tokenizer):
    text = "Riley went out. " * 50 + "Is it common to see frost?"
    ids = encode_text_classification([text], [0], tiny_bpe_tokenizer, max_length=24).input_ids[0]
    assert len(ids) == 24 and ids[0] == tiny_bpe_tokenizer.bos_token_id  # special tokens kept
    assert tiny_bpe_tokenizer.decode(ids, skip_special_tokens=True).endswith("Is it common to see frost?")
    assert tiny_bpe_tokenizer.truncation_side == "right"  # the tokenizer is left as it was


def test_length_sorted_orders_examples_by_padded_width_and_keeps_pairs(byte_tokenizer):
    from blob_pyro.assembly import length_sorted
    from blob_pyro.data import MultipleChoiceExample
    from blob_pyro.data.choice_scoring import encode_choice_continuations

    questions = ["a much longer question here?", "short?", "medium one?"]
    examples = [MultipleChoiceExample(question=q, choices=("x", "yy"), label=i % 2) for i, q in enumerate(questions)]
    for encode in (encode_multiple_choice, encode_choice_continuations):
        encoded = encode(examples, byte_tokenizer)
        positions, ordered = length_sorted([10, 11, 12], encoded)
        assert positions == [11, 12, 10]
        assert ordered.widths() == sorted(encoded.widths())
        assert ordered.labels.tolist() == [1, 0, 0]
