"""Calibration data arguments on local data."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from llmc.args import DatasetArguments
from llmc.data import build_calibration_dataloader, corpus
from llmc.testing import quant_recipe

TEXTS = [f"Sample number {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 5) for i in range(40)]


def _rows(loader) -> list[list[int]]:
    out = []
    for batch in loader:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            out.append(ids[mask.bool()].tolist())
    return out


def test_offline_corpus_splits_are_disjoint_real_text():
    cal, ev = corpus.split_texts("calibration"), corpus.split_texts("evaluation")
    assert len(cal) > 500 and len(ev) > 50
    assert not set(cal) & set(ev)
    assert all(len(t) >= 200 for t in cal[:50])
    assert corpus.split_texts("calibration") == cal  # deterministic


def test_registered_corpus_dataset(tokenizer):
    loader = build_calibration_dataloader(DatasetArguments(dataset="llmc-docs", num_calibration_samples=5, max_seq_length=32), tokenizer)
    batches = list(loader)
    assert len(batches) == 5 and batches[0]["input_ids"].shape == (1, 32)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_local_files(tmp_path, tokenizer, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("text\n" + "\n".join(f'"{t}"' for t in TEXTS))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    else:
        path.write_text(json.dumps([{"text": t} for t in TEXTS]))
    args = DatasetArguments(dataset_path=str(path), num_calibration_samples=12, max_seq_length=64,
                            pad_to_max_length=False, shuffle_calibration_samples=False)
    rows = _rows(build_calibration_dataloader(args, tokenizer))
    assert len(rows) == 12
    assert rows[0] == tokenizer(TEXTS[0], truncation=True, max_length=64)["input_ids"]


def test_dataset_dict_text_column_and_shuffle_seed(tokenizer):
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS})})
    base = dict(dataset=data, text_column="body", num_calibration_samples=10, max_seq_length=64, pad_to_max_length=False)
    a = _rows(build_calibration_dataloader(DatasetArguments(**base, seed=1), tokenizer))
    b = _rows(build_calibration_dataloader(DatasetArguments(**base, seed=1), tokenizer))
    c = _rows(build_calibration_dataloader(DatasetArguments(**base, seed=2), tokenizer))
    assert a == b and a != c
    with pytest.raises(ValueError, match="no 'text' column"):
        build_calibration_dataloader(DatasetArguments(dataset=data, num_calibration_samples=2), tokenizer)


def test_dataloader_passes_through(tokenizer):
    loader = DataLoader([{"input_ids": torch.ones(4, dtype=torch.long)}])
    assert build_calibration_dataloader(DatasetArguments(dataset=loader), tokenizer) is loader


def test_padding_versus_truncation(tokenizer):
    base = dict(dataset=datasets.Dataset.from_dict({"text": TEXTS[:4]}), num_calibration_samples=4,
                max_seq_length=64, batch_size=4, shuffle_calibration_samples=False, pad_to_max_length=False)
    lengths = [len(tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in TEXTS[:4]]
    (trunc,) = build_calibration_dataloader(DatasetArguments(**base, data_collator="truncation"), tokenizer)
    (pad,) = build_calibration_dataloader(DatasetArguments(**base, data_collator="padding"), tokenizer)
    assert trunc["input_ids"].shape == (4, min(lengths)) and trunc["attention_mask"].all()
    assert pad["input_ids"].shape == (4, max(lengths))
    assert pad["attention_mask"].sum(1).tolist() == lengths
    assert (pad["input_ids"][pad["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    (full,) = build_calibration_dataloader(DatasetArguments(**{**base, "pad_to_max_length": True}), tokenizer)
    assert full["input_ids"].shape == (4, 64)


@pytest.mark.parametrize("collator", ["truncation", "padding"])
def test_builtin_collator_batches_are_the_rows_as_tensors(tokenizer, collator):
    """The loader converts the rows' token lists to tensors once; its batches are what the
    collator makes of the rows as lists, for rows of one length and of several."""
    from llmc.data import load_calibration_rows, make_collator, tokenize

    def batch_keys(loss_mask: bool) -> set[str]:
        return {"input_ids", "attention_mask"} | ({"loss_mask"} if loss_mask else set())

    texts = datasets.Dataset.from_dict({"text": TEXTS[:6]})
    ids = torch.randint(4, 100, (6, 12)).tolist()
    tokenized = datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": [[0] * 4 + [1] * 8] * 6})
    for data, loss_mask, length in [(texts, False, 64), (tokenized, True, 10)]:
        args = DatasetArguments(dataset=data, num_calibration_samples=6, max_seq_length=length, batch_size=2,
                                shuffle_calibration_samples=False, data_collator=collator, use_loss_mask=loss_mask)
        rows = tokenize(load_calibration_rows(args), args, tokenizer)
        assert (len({len(r["input_ids"]) for r in rows}) > 1) == (data is texts)  # several lengths, or one
        expected = [make_collator(args, tokenizer)(rows[i : i + 2]) for i in range(0, 6, 2)]
        loader = build_calibration_dataloader(args, tokenizer)
        assert all(isinstance(row[k], torch.Tensor) for row in loader.dataset for k in batch_keys(loss_mask))
        batches = list(loader)
        assert len(batches) == 3
        for batch, reference in zip(batches, expected, strict=True):
            assert batch.keys() == reference.keys() == batch_keys(loss_mask)
            assert all(torch.equal(batch[k], reference[k]) for k in batch)


def test_input_ids_holding_a_chat_templates_whole_encoding(tokenizer):
    """llm-compressor's examples map rows to ``{"input_ids": tokenizer.apply_chat_template(
    messages, tokenize=True)}``, which transformers 5 returns as a BatchEncoding: its token ids
    and attention mask are read from it."""
    tokenizer = copy.deepcopy(tokenizer)  # the session's fixture keeps no template
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chats = [[{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}] for t in TEXTS[:4]]
    data = datasets.Dataset.from_dict({"chat": chats}).map(
        lambda row: {"input_ids": tokenizer.apply_chat_template(row["chat"], tokenize=True)}, remove_columns=["chat"]
    )
    assert isinstance(data[0]["input_ids"], dict)  # what transformers 5 gives
    args = DatasetArguments(dataset=data, num_calibration_samples=4, max_seq_length=64, shuffle_calibration_samples=False)
    expected = [tokenizer.apply_chat_template(c, tokenize=True)["input_ids"][:64] for c in chats]
    assert _rows(build_calibration_dataloader(args, tokenizer)) == expected
    with pytest.raises(ValueError, match="mappings without input_ids"):
        bad = datasets.Dataset.from_dict({"input_ids": [{"ids": [1, 2]}]})
        build_calibration_dataloader(DatasetArguments(dataset=bad, num_calibration_samples=1), tokenizer)


def test_concatenation_fills_rows(tokenizer):
    args = DatasetArguments(dataset=datasets.Dataset.from_dict({"text": TEXTS}), concatenate_data=True,
                            num_calibration_samples=6, max_seq_length=32, shuffle_calibration_samples=False)
    rows = _rows(build_calibration_dataloader(args, tokenizer))
    assert len(rows) == 6 and all(len(r) == 32 for r in rows)


def test_missing_hub_dataset_fails_fast_with_hint(tokenizer, monkeypatch):
    import time

    from llmc import data

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="dataset_path="):
        build_calibration_dataloader(DatasetArguments(dataset="nobody/no-such-dataset-xyz"), tokenizer)
    assert time.perf_counter() - started < 10  # no minutes of retries
    assert not datasets.config.HF_HUB_OFFLINE  # the switch is undone
    with pytest.raises(FileNotFoundError):
        build_calibration_dataloader(DatasetArguments(dataset_path="/nonexistent/data.json"), tokenizer)


@pytest.mark.parametrize(
    ("name", "row", "expected"),
    [
        ("gsm8k", {"question": "1+1?", "answer": "2"}, "Question: 1+1?\nAnswer: 2"),
        ("open_platypus", {"instruction": "Add.", "input": "1 and 1", "output": "2", "data_source": "x"},
         "### Instruction:\nAdd.\n\n1 and 1\n\n### Response:\n2"),
        ("wikitext", {"text": " = Title = \n"}, " = Title = \n"),
    ],
)
def test_named_hub_datasets_preprocess_their_rows(monkeypatch, tokenizer, name, row, expected):
    """The hub is out of reach here: the loader is fed a local dataset in the hub's schema."""
    from llmc import data
    from llmc.data import hub

    calls = []

    def fake_load_hub(path, config, split, streaming=False):
        calls.append((path, config, split, streaming))
        return datasets.Dataset.from_list([row] * 3)

    monkeypatch.setattr(data, "load_hub", fake_load_hub)
    args = DatasetArguments(dataset=name, num_calibration_samples=2, max_seq_length=64, pad_to_max_length=False)
    rows = _rows(build_calibration_dataloader(args, tokenizer))
    assert rows == [tokenizer(expected, truncation=True, max_length=64)["input_ids"]] * 2
    spec = hub.BUILTINS[name]
    assert calls == [(spec.path, spec.config, spec.split, False)]


def test_ultrachat_renders_messages_with_the_chat_template(monkeypatch):
    from llmc import data
    from llmc.tiny import build_tokenizer

    tok = build_tokenizer(2048)  # a fresh one: the session tokenizer keeps no chat template
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    monkeypatch.setattr(data, "load_hub", lambda *a, **k: datasets.Dataset.from_list([{"prompt": "hi", "messages": messages}]))
    args = DatasetArguments(dataset="ultrachat_200k", num_calibration_samples=1, max_seq_length=64, pad_to_max_length=False)
    (row,) = _rows(build_calibration_dataloader(args, tok))
    assert row == tok("<user>hi<assistant>hello", truncation=True, max_length=64)["input_ids"]


def test_named_hub_dataset_fails_fast_offline(monkeypatch, tokenizer):
    import time

    from llmc import data

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="(?s)Could not load dataset 'openai/gsm8k'.*dataset_path="):
        build_calibration_dataloader(DatasetArguments(dataset="gsm8k"), tokenizer)
    assert time.perf_counter() - started < 10


def test_large_offline_corpus_adds_stdlib_docstrings():
    small, large = corpus.split_texts("calibration"), corpus.split_texts("calibration", corpus.LARGE_NAME)
    assert set(small) < set(large) and len(large) > 1.5 * len(small)
    assert not set(large) & set(corpus.split_texts("evaluation", corpus.LARGE_NAME))
    with pytest.raises(ValueError, match="Unknown offline corpus"):
        corpus.split_texts("calibration", "nope")


def test_a_callable_data_collator_gets_the_rows(tokenizer, llama_path, tmp_path):
    """As in llm-compressor 0.14: the collator is called with the dataset's rows (dicts of
    input_ids and attention_mask lists, and a tokenized dataset's other columns)."""
    seen: list[list[dict]] = []

    def first_row(batch: list[dict]) -> dict:
        seen.append(batch)
        return {key: torch.tensor([value]) for key, value in batch[0].items() if key != "loss_mask"}

    texts = datasets.Dataset.from_dict({"text": TEXTS[:3]})
    args = DatasetArguments(dataset=texts, num_calibration_samples=3, max_seq_length=16,
                            shuffle_calibration_samples=False, data_collator=first_row)
    batches = list(build_calibration_dataloader(args, tokenizer))
    expected = tokenizer(TEXTS[0], truncation=True, max_length=16)["input_ids"]
    assert seen[0] == [{"input_ids": expected, "attention_mask": [1] * len(expected)}]
    assert batches[0]["input_ids"].tolist() == [expected]

    tokenized = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]], "loss_mask": [[0, 0, 1, 1]]})
    seen.clear()
    args = DatasetArguments(dataset=tokenized, num_calibration_samples=1, max_seq_length=3, data_collator=first_row)
    list(build_calibration_dataloader(args, tokenizer))
    assert seen[0] == [{"input_ids": [5, 6, 7], "loss_mask": [0, 0, 1], "attention_mask": [1, 1, 1]}]
    # and oneshot runs with it (GPTQ needs the data)
    from llmc import oneshot

    oneshot(model=str(llama_path), dataset=texts, recipe=quant_recipe("W4A16", modifier="GPTQModifier"),
            data_collator=first_row, num_calibration_samples=3, max_seq_length=16, output_dir=str(tmp_path / "o"))
    assert len(seen) > 1 and (tmp_path / "o" / "config.json").exists()


def test_the_hub_is_asked_as_huggingface_hub_asks_it(monkeypatch):
    """HF_HUB_OFFLINE means no request at all; otherwise huggingface_hub's own session (its
    endpoint, proxies, headers) asks, not a raw socket."""
    import huggingface_hub.utils
    from huggingface_hub import constants

    from llmc.data import hub_reachable

    asked = []

    class Session:
        def __init__(self, fails: bool) -> None:
            self.fails = fails

        def head(self, url, timeout):
            asked.append(url)
            if self.fails:
                raise OSError("unreachable")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session(fails=False))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable() and asked == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub_reachable() and asked == [constants.ENDPOINT]
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session(fails=True))
    assert not hub_reachable()
