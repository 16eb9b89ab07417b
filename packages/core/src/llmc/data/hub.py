"""Named hub datasets, as llm-compressor users know them, each with its preprocessing.

Each loader fetches through ``datasets.load_dataset`` (so a local cache or a mirror
works, and a machine without the hub fails fast: see :func:`llmc.data.load_hub`) and
returns rows with a ``text`` column, or ``messages`` rendered with the tokenizer's chat
template later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import datasets


@attrs.frozen
class HubDataset:
    """Where a named dataset lives and how its rows become calibration text."""

    path: str
    config: str | None
    split: str
    to_text: Callable[[dict[str, Any]], dict[str, Any]]
    streaming: bool = False

    def __call__(self, args, split: str | None = None) -> datasets.Dataset:
        from llmc.data import load_hub

        loaded = load_hub(
            self.path,
            args.dataset_config_name or self.config,
            split or self.split,
            streaming=args.streaming or self.streaming,
        )
        return preprocess(loaded, self.to_text, args)


def preprocess(data: Any, to_text: Callable[[dict[str, Any]], dict[str, Any]], args) -> Any:
    columns = data.column_names or []
    kwargs = {} if isinstance(data, datasets.IterableDataset) else {"num_proc": args.preprocessing_num_workers}
    return data.map(to_text, remove_columns=[c for c in columns if c not in ("text", "messages")], **kwargs)


def _messages(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": row["messages"]}


def _gsm8k(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": f"Question: {row['question']}\nAnswer: {row['answer']}"}


def _platypus(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row["instruction"]
    if row.get("input"):
        prompt += f"\n\n{row['input']}"
    return {"text": f"### Instruction:\n{prompt}\n\n### Response:\n{row['output']}"}


def _text(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": row["text"]}


BUILTINS: dict[str, HubDataset] = {
    "ultrachat_200k": HubDataset("HuggingFaceH4/ultrachat_200k", None, "train_sft", _messages),
    "gsm8k": HubDataset("openai/gsm8k", "main", "train", _gsm8k),
    "open_platypus": HubDataset("garage-bAInd/Open-Platypus", None, "train", _platypus),
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "train", _text),
    "c4": HubDataset("allenai/c4", "en", "train", _text, streaming=True),
}
