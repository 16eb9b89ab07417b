"""ClipRTN against round-to-nearest, registered in-process (no install needed)."""

import pytest
import torch
import transformers

from llmc import oneshot
from llmc.api import get_registry, rounding_error, weight_qparams
from llmc.plugins import get_plugin_manager

RECIPE = """
quant_stage:
  quant_modifiers:
    ClipRTNModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head], steps: 20}
"""


@pytest.fixture(scope="module")
def registered():
    import llmc_cliprtn

    pm = get_plugin_manager()
    if not pm.is_registered(llmc_cliprtn):
        pm.register(llmc_cliprtn, name="cliprtn")
    yield llmc_cliprtn
    pm.unregister(llmc_cliprtn)


def test_cliprtn_rounds_no_group_worse_than_rtn_and_all_better(registered, llama_path, tmp_path):
    source = llama_path  # llmc.testing's fixture: a tiny Llama built locally
    assert get_registry().has("modifier", "ClipRTNModifier")
    reference = transformers.AutoModelForCausalLM.from_pretrained(source)
    original = {n: m.weight.detach() for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    model = oneshot(model=str(source), recipe=RECIPE, output_dir=str(tmp_path / "out"))
    total_clip = total_rtn = 0.0
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        weight, args = original[name], module.quantization_scheme.weights
        clip = rounding_error(weight, module.weight_scale, getattr(module, "weight_zero_point", None), args)
        rtn = rounding_error(weight, *weight_qparams(weight, args), args)
        assert (clip <= rtn * (1 + 1e-5)).all(), name
        total_clip, total_rtn = total_clip + float(clip.sum()), total_rtn + float(rtn.sum())
    assert total_clip < 0.97 * total_rtn
    assert (tmp_path / "out" / "config.json").exists()
