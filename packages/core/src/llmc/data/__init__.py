"""Calibration data: from any accepted ``dataset`` argument to a DataLoader of token batches."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy
import torch
from torch.utils.data import DataLoader

from llmc.args import DatasetArguments
from llmc.lifecycle import LOSS_MASK

logger = logging.getLogger(__name__)

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _pick_split(data: datasets.DatasetDict, split: str | None) -> datasets.Dataset:
    for name in [split] if split else ["calibration", "train", "test", "validation"]:
        if name in data:
            return data[name]
    if split:
        raise ValueError(f"Dataset has no split {split!r}; its splits are {list(data)}.")
    return data[next(iter(data))]


def _load_local(path: str) -> datasets.Dataset:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset_path {path!r} does not exist.")
    files = sorted(f for f in p.iterdir() if f.suffix in _LOCAL_FORMATS) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"dataset_path {path!r} holds no JSON, JSONL, CSV, text or parquet file.")
    kinds = {_LOCAL_FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(
            f"dataset_path {path!r}: use files of one format among {sorted(_LOCAL_FORMATS)}."
        )
    try:
        loaded = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets' own errors (DatasetGenerationError, StopIteration) vary
        raise ValueError(
            f"dataset_path {path!r} could not be read as a dataset ({type(exc).__name__}: {exc}). "
            "Check that the file is valid JSON Lines / JSON / CSV with one sample per row."
        ) from None
    if len(loaded) == 0:
        raise ValueError(f"dataset_path {path!r} holds no rows.")
    return loaded


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds, asked the way
    huggingface_hub asks it: never under ``HF_HUB_OFFLINE``, through its own HTTP session
    (its endpoint, proxy settings and headers)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 (any transport failure means: not reachable now)
        return False
    return True


@contextlib.contextmanager
def _offline_unless_hub_reachable():
    """Without a hub, ask ``datasets`` for its local cache only, instead of retrying for minutes."""
    if datasets.config.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    logger.info("The Hugging Face hub is unreachable: looking in the local datasets cache only.")
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = False


def _load_named(name: str, args: DatasetArguments) -> datasets.Dataset:
    from llmc.plugins import get_registry

    registry = get_registry()
    if registry.has("dataset", name):
        return registry.get("dataset", name)(args, args.splits)
    if os.path.exists(name):
        return _load_local(name)
    return load_hub(name, args.dataset_config_name, args.splits, streaming=args.streaming)


def load_hub(name: str, config: str | None, split: str | None, streaming: bool = False) -> Any:
    """``datasets.load_dataset`` with a fast, explained failure when the hub is out of reach."""
    try:
        with _offline_unless_hub_reachable():
            loaded = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:
        from llmc.plugins import get_registry

        raise ValueError(
            f"Could not load dataset {name!r}: {exc}\nThis machine may not reach the Hugging Face "
            "hub: pass dataset_path= with a local JSON/JSONL/CSV file, a datasets.Dataset, or a "
            f"registered name ({', '.join(sorted(get_registry().names('dataset')))})."
        ) from exc
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = _pick_split(loaded, split)
    return loaded


def load_raw_dataset(args: DatasetArguments) -> datasets.Dataset | DataLoader:
    if args.dataset is not None and args.dataset_path is not None:
        raise ValueError("Pass either dataset= or dataset_path=, not both.")
    source = args.dataset if args.dataset is not None else args.dataset_path
    if isinstance(source, (DataLoader, datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _pick_split(source, args.splits)
    if args.dataset_path is not None:
        return _load_local(str(args.dataset_path))
    if isinstance(source, (str, os.PathLike)):
        return _load_named(str(source), args)
    raise TypeError(
        f"dataset must be a name, a datasets.Dataset/DatasetDict or a DataLoader, got {type(source).__name__}."
    )


def _select(data: Any, args: DatasetArguments, count: int) -> datasets.Dataset:
    if isinstance(data, datasets.IterableDataset):
        if args.shuffle_calibration_samples:
            data = data.shuffle(seed=args.seed, buffer_size=10 * count)
        return datasets.Dataset.from_list(list(data.take(count)))
    if args.shuffle_calibration_samples:
        data = data.shuffle(seed=args.seed)
    if len(data) < count:
        logger.warning("Dataset has %d samples, fewer than the %d asked for.", len(data), count)
    return data.select(range(min(count, len(data))))


def _texts(data: datasets.Dataset, args: DatasetArguments, tokenizer: Any) -> list[str]:
    """Each row's text: its text column, else its chat rendered (load_calibration_rows checked
    that one of them is there)."""
    if args.text_column in data.column_names:
        return list(data[args.text_column])
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in data["messages"]]
    return ["\n".join(turn["content"] for turn in m) for m in data["messages"]]


Row = dict[str, Any]
# per-token columns: cut and padded with the row's input_ids
_TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", LOSS_MASK)


def _row(ids: list[int]) -> Row:
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def tokenize(data: datasets.Dataset, args: DatasetArguments, processor: Any) -> list[Row]:
    """One row per sample, as llm-compressor's data collators receive them: ``input_ids`` and
    ``attention_mask`` lists (truncated, or concatenated into full rows); a dataset that is
    already tokenized keeps its other columns too."""
    if "input_ids" in data.column_names:
        rows = []
        for row in data:
            row = dict(row)
            if isinstance(row["input_ids"], dict):  # a tokenizer's whole output, see _unwrap_encoding
                row = _unwrap_encoding(row)
            for key in _TOKEN_COLUMNS:
                if key in row:
                    row[key] = list(row[key])[: args.max_seq_length]
            row.setdefault("attention_mask", [1] * len(row["input_ids"]))
            rows.append(row)
        return rows
    tokenizer = _tokenizer_of(processor)
    if tokenizer is None:
        raise ValueError("Tokenizing calibration text needs a tokenizer: pass tokenizer=.")
    texts = _texts(data, args, tokenizer)
    if args.concatenate_data:
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        n = args.max_seq_length
        return [_row(ids[i : i + n]) for i in range(0, len(ids) - n + 1, n)]
    encoded = tokenizer(texts, truncation=True, max_length=args.max_seq_length)["input_ids"]
    return [_row(list(e)) for e in encoded if len(e) > 0]


def _unwrap_encoding(row: Row) -> Row:
    """A row whose ``input_ids`` holds a tokenizer's whole output, as a map that stores
    ``{"input_ids": tokenizer.apply_chat_template(messages, tokenize=True)}`` writes under
    transformers 5 (which returns a BatchEncoding there; llm-compressor's examples do so): its
    ``input_ids`` and, unless the row has its own, ``attention_mask``."""
    encoding = row["input_ids"]
    if "input_ids" not in encoding:
        raise ValueError(f"Column input_ids holds mappings without input_ids (keys {sorted(encoding)}): "
                         "store the token ids themselves.")
    unwrapped = {**row, "input_ids": encoding["input_ids"]}
    if encoding.get("attention_mask") is not None:
        unwrapped.setdefault("attention_mask", encoding["attention_mask"])
    return unwrapped


def _tensor_rows(rows: list[Row]) -> list[Row]:
    """``rows`` with their token columns as tensors, converted in one call per column where
    the rows are of one length. The built-in collator then copies tensors instead of
    converting Python lists for every batch, work that the sequential pipeline's capture
    would otherwise do on the thread that launches the first layer's kernels."""
    out = [dict(row) for row in rows]
    for key in ("input_ids", "attention_mask", LOSS_MASK):  # what the collator reads
        values = [row.get(key) for row in rows]
        if any(v is None for v in values):
            continue
        try:
            if len({len(v) for v in values}) == 1:
                # through numpy: a third of torch.tensor's time on nested lists
                converted: Any = torch.from_numpy(numpy.array(values, dtype=numpy.int64)).unbind(0)
            else:
                converted = [torch.tensor(v, dtype=torch.long) for v in values]
        except (TypeError, ValueError):  # not flat integer lists: the collator will say so
            continue
        for row, value in zip(out, converted, strict=True):
            row[key] = value
    return out


def _pad_id(processor: Any) -> int:
    tokenizer = _tokenizer_of(processor)
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def make_collator(args: DatasetArguments, processor: Any) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
    """'truncation' cuts a batch to its shortest sample; 'padding' pads to its longest. A
    callable ``data_collator`` gets the rows themselves (dicts, see :func:`tokenize`)."""
    if callable(args.data_collator):
        return args.data_collator
    pad_id = _pad_id(processor)
    pad_to = args.max_seq_length if args.pad_to_max_length else None
    truncate = args.data_collator == "truncation"

    def collate(rows: list[Row]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        if pad_to is not None:
            width = pad_to
        else:
            width = min(lengths) if truncate else max(lengths)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.long) if args.use_loss_mask else None
        for i, row in enumerate(rows):
            tokens = row["input_ids"][:width]
            ids[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = torch.as_tensor(row["attention_mask"][: len(tokens)], dtype=torch.long)
            if loss_mask is not None:
                loss_mask[i, : len(tokens)] = torch.as_tensor(row[LOSS_MASK][: len(tokens)], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        return batch if loss_mask is None else {**batch, LOSS_MASK: loss_mask}

    return collate


def _preprocess(data: Any, args: DatasetArguments) -> Any:
    """``preprocessing_func`` on every row, then ``remove_columns`` dropped."""
    if args.preprocessing_func is not None:
        data = data.map(args.preprocessing_func)
    if args.remove_columns:
        missing = [c for c in args.remove_columns if c not in (data.column_names or [])]
        if missing:
            raise ValueError(f"remove_columns names columns the dataset does not have: {missing} (columns: {data.column_names}).")
        data = data.remove_columns(args.remove_columns)
    return data


def load_calibration_rows(args: DatasetArguments) -> datasets.Dataset | DataLoader:
    """The samples to calibrate on, selected and checked, before any model is loaded: a
    missing file, an empty dataset or one without a text column fails here, not after
    the model is in memory. A DataLoader is taken as it is."""
    raw = load_raw_dataset(args)
    if isinstance(raw, DataLoader):
        return raw
    raw = _preprocess(raw, args)
    count = args.num_calibration_samples
    if args.concatenate_data:  # rows are filled from as many samples as it takes
        count = len(raw) if hasattr(raw, "__len__") else count * 4
    selected = _select(raw, args, count)
    if len(selected) == 0:
        raise ValueError("The calibration dataset holds no rows.")
    columns = selected.column_names
    if "input_ids" not in columns and args.text_column not in columns and "messages" not in columns:
        raise ValueError(
            f"Dataset has no {args.text_column!r} column (columns: {columns}); set text_column= "
            "to the column holding the text, or give input_ids or messages."
        )
    if args.use_loss_mask and LOSS_MASK not in columns:
        raise ValueError(
            "use_loss_mask=True needs a tokenized dataset with a 'loss_mask' column (1 for the "
            "tokens that count, 0 for the others, e.g. a chat's prompt); this one has none."
        )
    if "input_ids" not in columns and args.text_column in columns:
        for index, text in enumerate(selected[args.text_column]):
            if not isinstance(text, str):
                raise ValueError(
                    f"Row {index} of the {args.text_column!r} column holds {text!r} "
                    f"({type(text).__name__}), not text; clean the dataset or choose text_column=."
                )
    return selected


def build_calibration_dataloader(
    args: DatasetArguments, processor: Any, rows: datasets.Dataset | DataLoader | None = None
) -> DataLoader:
    """Token batches from ``rows`` (:func:`load_calibration_rows`, loaded now if not given)."""
    raw = load_calibration_rows(args) if rows is None else rows
    if isinstance(raw, DataLoader):
        return raw
    count = args.num_calibration_samples
    if args.concatenate_data:
        rows_ = tokenize(raw, args, processor)[:count]
    else:
        rows_ = tokenize(raw, args, processor)
    if not rows_:
        raise ValueError("Calibration data is empty after tokenization.")
    logger.info("Calibrating on %d samples of up to %d tokens", len(rows_), args.max_seq_length)
    if not callable(args.data_collator):  # a user's collator gets the rows as llm-compressor's does
        rows_ = _tensor_rows(rows_)
    return DataLoader(
        rows_,
        batch_size=args.batch_size,
        shuffle=False,
        collate_fn=make_collator(args, processor),
        num_workers=args.dataloader_num_workers,
    )
