"""oneshot argument groups: names, defaults and validation."""

from __future__ import annotations

import pytest

from llmc.args import parse_oneshot_args


def test_defaults_match_llm_compressor():
    args = parse_oneshot_args(model="m")
    assert args.model.precision == "auto" and args.model.save_compressed is True
    assert args.model.model_revision == "main" and args.model.trust_remote_code_model is False
    assert args.dataset.num_calibration_samples == 512 and args.dataset.max_seq_length == 384
    assert args.dataset.batch_size == 1 and args.dataset.data_collator == "truncation"
    assert args.dataset.shuffle_calibration_samples is True and args.dataset.text_column == "text"
    assert args.pipeline.pipeline == "independent" and args.pipeline.sequential_offload_device == "cpu"
    assert args.pipeline.quantization_aware_calibration is True
    assert args.output.output_dir is None and args.output.log_dir is None


def test_unknown_keyword_names_the_closest():
    with pytest.raises(TypeError, match="unknown argument 'num_calibration_sample'.*'num_calibration_samples'"):
        parse_oneshot_args(model="m", num_calibration_sample=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_calibration_samples": 0}, "positive"),
        ({"max_seq_length": -1}, "positive"),
        ({"data_collator": "zip"}, "data_collator"),
        ({"precision": "int3"}, "precision"),
        ({"recipe_args": ["noequals"]}, "key=value"),
    ],
)
def test_invalid_values(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_oneshot_args(model="m", **kwargs)


def test_model_is_required():
    with pytest.raises(TypeError):
        parse_oneshot_args()
    with pytest.raises(ValueError, match="model is required"):
        parse_oneshot_args(model="")
