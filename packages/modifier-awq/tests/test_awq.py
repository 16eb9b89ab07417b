"""AWQModifier end to end, and its scale search."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.quantization import preset_name_to_scheme
from safetensors.torch import load_file

from llmc import oneshot
from llmc.mappings import fold_scales, resolve_mappings
from llmc.testing import needs
from llmc_awq import search
from llmc_awq.search import GramError, OutputError, fake_quantized, search_scales

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)

YAML = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      ignore: [lm_head]
      scheme: {scheme}
      targets: [Linear]
      duo_scaling: true
      mappings:
        - smooth_layer: re:.*input_layernorm$
          balance_layers: [re:.*q_proj$, re:.*k_proj$, re:.*v_proj$]
        - smooth_layer: re:.*v_proj$
          balance_layers: [re:.*o_proj$]
        - smooth_layer: re:.*post_attention_layernorm$
          balance_layers: [re:.*gate_proj$, re:.*up_proj$]
        - smooth_layer: re:.*up_proj$
          balance_layers: [re:.*down_proj$]
"""


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def error(model, reference, ids):
    return float((logits(model, ids) - reference).pow(2).mean())


def _reference_search(weight: torch.Tensor, x: torch.Tensor, group: int, n_grid: int, duo: bool) -> torch.Tensor:
    """AWQ's grid search written out from the paper (and llm-compressor's choices: |W| over its
    group's max, averaged over rows; s = x^r / w^(1-r), normalised by sqrt(max * min)), with
    int4 asymmetric group round-to-nearest by hand: the scales of least output error."""
    rows, cols = weight.shape
    g = weight.abs().reshape(rows, cols // group, group)
    w_mean = (g / g.amax(dim=-1, keepdim=True)).reshape(rows, cols).mean(0)
    x_mean = x.abs().mean(0)

    def rtn(w: torch.Tensor) -> torch.Tensor:
        blocks = w.reshape(rows, cols // group, group)
        lo = blocks.amin(-1, keepdim=True).clamp(max=0)
        hi = blocks.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 15
        zero = torch.round(-lo / scale) - 8
        q = torch.clamp(torch.round(blocks / scale) + zero, -8, 7)
        return ((q - zero) * scale).reshape(rows, cols)

    reference = x @ weight.T
    best, best_loss = torch.ones(cols), float((x @ rtn(weight).T - reference).pow(2).mean())
    for i in range(n_grid):
        r = i / n_grid
        s = (x_mean**r / w_mean ** (1 - r)) if duo else x_mean**r
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = float((x @ (rtn(weight * s) / s).T - reference).pow(2).mean())
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@pytest.mark.parametrize("measure", ["outputs", "gram"])
@pytest.mark.parametrize("duo", [True, False])
def test_search_picks_the_scales_a_brute_force_search_picks(duo, measure):
    """Both measures of the output error (the layer re-run on its inputs, or their Gram matrix)
    pick the scales a brute-force search over the layer's outputs picks."""
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(512, 32, bias=False)
    with torch.no_grad():
        # groups of very different ranges: normalising |W| by its group's max matters
        linear.weight.copy_(torch.randn(32, 512, generator=g) * torch.tensor([1.0, 8.0, 0.2, 3.0]).repeat_interleave(128))
    x = torch.randn(256, 512, generator=g) * (1 + 10 * torch.rand(512, generator=g) ** 4)
    with torch.no_grad():
        error = OutputError(lambda i: linear(x), 1) if measure == "outputs" else GramError(linear, x.T @ x, x.shape[0])
        result = search_scales(error, [linear], x.abs().mean(0), args, n_grid=10, duo_scaling=duo)
        expected = _reference_search(linear.weight.detach(), x, 128, 10, duo)
        other = _reference_search(linear.weight.detach(), x, 128, 10, not duo)
    assert not torch.allclose(expected, other)  # the problem tells the two modes apart
    torch.testing.assert_close(result.scales, expected, rtol=1e-5, atol=1e-6)


def test_search_never_worse_than_rtn_and_uniform_scales_are_one():
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=False)
    gain = torch.ones(256)
    gain[[5, 77, 130, 200]] = 20.0  # a few salient input channels, as in real activations
    x = torch.randn(512, 256) * gain
    result = search_scales(OutputError(lambda i: linear(x), 1), [linear], x.abs().mean(0), args, n_grid=20, duo_scaling=True)
    rtn = float((torch.nn.functional.linear(x, fake_quantized(linear.weight.data, args)) - linear(x)).pow(2).mean())
    torch.testing.assert_close(result.rtn_loss, rtn, rtol=1e-4, atol=0)
    assert result.loss < 0.8 * result.rtn_loss  # salient channels protected
    both = search_scales(OutputError(lambda i: linear(x), 1), [linear], x.abs().mean(0), args, n_grid=20, duo_scaling="both")
    assert both.loss <= result.loss  # a superset of candidates

    uniform = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        uniform.weight.copy_(torch.sign(torch.randn(64, 256)))
    flat = torch.ones(512, 256)
    result = search_scales(OutputError(lambda i: uniform(flat), 1), [uniform], flat.mean(0), args, n_grid=20, duo_scaling=True)
    torch.testing.assert_close(result.scales, torch.ones(256))


def _salient_problem(seed: int, calls: int):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=g))
    gain = 1 + 10 * torch.rand(256, generator=g) ** 4
    xs = [torch.randn(64, 256, generator=g) * gain for _ in range(calls)]
    return linear, xs


@pytest.mark.parametrize("seed", range(4))
def test_ranking_on_a_sample_of_calls_picks_what_the_full_search_picks(monkeypatch, seed):
    """With enough cached calls every candidate is ranked on a sample of them (every
    SAMPLE_STRIDE-th) and only the shortlist is measured on all: the same scales as measuring
    every candidate on every call, with fewer than half the forward passes; the losses
    reported are full-data ones."""
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    linear, xs = _salient_problem(seed, calls=16)
    x = torch.cat(xs)
    runs = []

    def run(i: int) -> torch.Tensor:
        runs.append(i)
        return linear(xs[i])

    def searched():
        runs.clear()
        with torch.no_grad():
            return search_scales(OutputError(run, len(xs)), [linear], x.abs().mean(0), args, n_grid=20, duo_scaling=True), len(runs)

    sampled, sampled_runs = searched()
    monkeypatch.setattr(search, "MIN_SAMPLED_CALLS", len(xs) + 1)
    full, full_runs = searched()
    torch.testing.assert_close(sampled.scales, full.scales, rtol=0, atol=0)
    assert sampled.loss == full.loss and sampled.rtn_loss == full.rtn_loss
    assert full_runs == 16 * 22  # the reference and 21 candidates, every call
    sample = len(range(0, 16, search.SAMPLE_STRIDE))
    assert sampled_runs == 16 + 21 * sample + 4 * 16  # reference, every candidate on the sample, 4 finalists on all
    with torch.no_grad():
        s = sampled.scales
        loss = float((torch.nn.functional.linear(x, fake_quantized(linear.weight * s, args) / s) - linear(x)).pow(2).mean())
    torch.testing.assert_close(sampled.loss, loss, rtol=1e-4, atol=0)


def test_a_misleading_sample_never_costs_more_than_round_to_nearest(monkeypatch):
    """The sample's ranking only shortlists: round-to-nearest is always measured on every call,
    so a sample unlike the rest (here: its calls alone carry salient channels, the others are
    larger and flat) can at worst return round-to-nearest's scales, with the full data's losses."""
    monkeypatch.setattr(search, "SAMPLE_STRIDE", 4)  # a quarter of the calls mislead
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    linear, xs = _salient_problem(0, calls=16)
    flat = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    xs = [x if i % search.SAMPLE_STRIDE == 0 else flat * 3 for i, x in enumerate(xs)]
    x = torch.cat(xs)
    with torch.no_grad():
        result = search_scales(OutputError(lambda i: linear(xs[i]), len(xs)), [linear], x.abs().mean(0), args, n_grid=20, duo_scaling=True)
        rtn = float((torch.nn.functional.linear(x, fake_quantized(linear.weight, args)) - linear(x)).pow(2).mean())
    torch.testing.assert_close(result.rtn_loss, rtn, rtol=1e-4, atol=0)
    assert result.loss == result.rtn_loss  # every shortlisted scaling is worse on all the data
    torch.testing.assert_close(result.scales, torch.ones(256), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_folding_keeps_the_function(checkpoint_factory, arch, sample_ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_factory(arch))
    reference = logits(model, sample_ids)
    resolved = resolve_mappings(model, None, "awq")
    folded = 0
    generator = torch.Generator().manual_seed(0)
    for mapping in resolved:
        if any(b.weight.shape[1] != mapping.smooth.weight.shape[0] for b in mapping.balance):
            continue  # v_proj -> o_proj under grouped-query attention
        fold_scales(mapping, torch.rand(mapping.smooth.weight.shape[0], generator=generator) * 3 + 0.2)
        folded += 1
    assert folded >= 3 * model.config.num_hidden_layers
    torch.testing.assert_close(logits(model, sample_ids), reference, atol=2e-4, rtol=2e-4)


def salient_copy(src, dst):
    """The checkpoint with a few activation channels ~20x larger, as trained models have."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 99]] *= 20.0
    model.save_pretrained(dst)
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_awq_oneshot_beats_rtn(checkpoint_factory, arch, tmp_path, sample_ids):
    path = salient_copy(checkpoint_factory(arch), tmp_path / "src")
    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(path), sample_ids)
    out = tmp_path / "awq"
    awq = oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"AWQModifier": {"ignore": ["lm_head"]}}}},
                  output_dir=str(out), **DATA)
    rtn = oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"QuantizationModifier": {
        "scheme": "W4A16_ASYM", "ignore": ["lm_head"]}}}})
    assert error(awq, reference, sample_ids) < error(rtn, reference, sample_ids)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight_zero_point"].dtype == torch.int32


def test_llm_compressor_yaml_runs_unchanged_and_reloads(llama_path, tmp_path, sample_ids):
    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=YAML.format(scheme="W4A16"), output_dir=str(out), **DATA)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), atol=1e-4, rtol=1e-4)
    assert "AWQModifier" in (out / "recipe.yaml").read_text()


def test_missing_mappings_error(tmp_path):
    path = tmp_path / "gpt2"
    transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=2048)
    ).save_pretrained(path)
    from llmc import tiny

    tiny.build_tokenizer(2048).save_pretrained(path)
    with pytest.raises(ValueError, match="(?s)No default awq mappings for GPT2LMHeadModel.*Pass mappings="):
        # GPT-2's Conv1D layers are no Linear: only allowed, the run gets as far as its mappings
        oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"AWQModifier": {"ignore": ["lm_head"]}}}},
                allow_unmatched_targets=True, **DATA)
    with pytest.raises(ValueError, match=r"select no module of GPT2LMHeadModel.*Conv1D"):
        oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"AWQModifier": {"ignore": ["lm_head"]}}}}, **DATA)


def test_bad_awq_arguments():
    with pytest.raises(ValueError, match="duo_scaling"):
        oneshot(model="unused", recipe={"s": {"quant_modifiers": {"AWQModifier": {"duo_scaling": "sometimes"}}}})


@pytest.mark.parametrize("quantizer", ["QuantizationModifier", pytest.param("GPTQModifier", marks=needs("llmc_gptq"))])
def test_awq_as_a_transform_takes_the_next_modifiers_quantization(quantizer, llama_path, tmp_path, caplog):
    """llm-compressor 0.14's shape: AWQ (no scheme) scales, the modifier after it quantizes
    with its own ignore and scheme: lm_head stays dense, one config group."""
    recipe = f"""
quant_stage:
  quant_modifiers:
    AWQModifier: {{n_grid: 4}}
    {quantizer}: {{targets: [Linear], scheme: W4A16_ASYM, ignore: [lm_head]}}
"""
    out = tmp_path / "awq-then-rtn"
    with caplog.at_level("INFO", logger="llmc_awq"):
        model = oneshot(model=str(llama_path), recipe=recipe, output_dir=str(out), **DATA)
    assert f"AWQ scales for {quantizer}'s quantization" in caplog.text
    # 3 mappings a layer searched (v_proj -> o_proj does not fit GQA's shapes), 2 layers
    assert sum("output error" in r.getMessage() for r in caplog.records) == 3 * 2
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 1 and config["ignore"] == ["lm_head"]
    assert list(config["config_groups"].values())[0]["weights"]["symmetric"] is False
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" in tensors and "lm_head.weight_packed" not in tensors
    assert getattr(model.lm_head, "quantization_scheme", None) is None
    # and it is AWQ: scales were folded into the norms the search balanced
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_path)
    norms = [(n, p) for n, p in model.named_parameters() if "layernorm" in n]
    reference = dict(original.named_parameters())
    assert any(not torch.equal(p, reference[n]) for n, p in norms)


def test_llm_compressor_example_shape_with_awq_mappings(llama_path, tmp_path):
    """0.14's examples: ``from llmcompressor.modifiers.transform.awq import AWQMapping,
    AWQModifier`` with mappings as AWQMapping objects (one naming the module to observe, as
    its parallel blocks do) writes what the same mappings as YAML dicts write."""
    from llmc.modifiers.quantization import QuantizationModifier
    from llmc.modifiers.transform.awq import AWQMapping, AWQModifier

    mappings = [
        AWQMapping("re:.*input_layernorm$", ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
        # the balance layers' common parent is the MLP: its up_proj reads the norm's output too
        AWQMapping("re:.*post_attention_layernorm$", ["re:.*gate_proj$", "re:.*up_proj$"], activation_hook_target="up_proj"),
        AWQMapping("re:.*up_proj$", ["re:.*down_proj$"]),
    ]
    quantize = QuantizationModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])
    oneshot(model=str(llama_path), recipe=[AWQModifier(mappings=mappings, n_grid=4), quantize],
            output_dir=str(tmp_path / "objects"), **DATA)
    as_dicts = [{"smooth_layer": m.smooth_layer, "balance_layers": list(m.balance_layers)} for m in mappings]
    oneshot(model=str(llama_path), recipe={"s": {"m_modifiers": {"AWQModifier": {"mappings": as_dicts, "n_grid": 4},
                                                         "QuantizationModifier": {"targets": ["Linear"], "scheme": "W4A16_ASYM", "ignore": ["lm_head"]}}}},
            output_dir=str(tmp_path / "dicts"), **DATA)
    a, b = load_file(tmp_path / "objects" / "model.safetensors"), load_file(tmp_path / "dicts" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_hook_target_names_the_observed_module_under_the_common_parent(llama_path):
    from llmc.mappings import AWQMapping, balance_input_source

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_path)
    mlp = model.model.layers[1].mlp
    [_, resolved] = resolve_mappings(model, [AWQMapping("re:.*post_attention_layernorm$", ["re:.*gate_proj$", "re:.*up_proj$"], "up_proj")], "awq")
    assert balance_input_source(resolved) == (mlp.up_proj, False)
    # one balance layer: its own name is the common "parent", as in llm-compressor
    with pytest.raises(ValueError, match="activation_hook_target 'act_fn' .* no module under 'model.layers.0.mlp.down_proj'"):
        resolve_mappings(model, [AWQMapping("re:.*up_proj$", ["re:.*down_proj$"], "act_fn")], "awq")
    [_, resolved] = resolve_mappings(model, [{"smooth_layer": "re:.*input_layernorm$", "balance_layers": ["re:.*q_proj$", "re:.*k_proj$"],
                                              "activation_hook_target": "k_proj"}], "awq")
    assert balance_input_source(resolved) == (model.model.layers[1].self_attn.k_proj, False)


def test_awq_alone_without_a_scheme_quantizes_w4a16_asym(llama_path, tmp_path):
    out = tmp_path / "awq"
    oneshot(model=str(llama_path), recipe="quant_stage:\n  quant_modifiers:\n    AWQModifier: {n_grid: 2, ignore: [lm_head]}\n",
            output_dir=str(out), **DATA)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert list(config["config_groups"].values())[0]["weights"]["symmetric"] is False


# --- weight clipping ----------------------------------------------------------------------


def _int4_asym(w: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """W4A16_ASYM's round trip of one group for the range [lo, hi], written out."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 15
    zero = max(-8, min(7, round(-8 - lo / scale)))
    return (torch.clamp(torch.round(w / scale) + zero, -8, 7) - zero) * scale


@pytest.mark.parametrize("ratios_per_call", [None, 1, 7])
def test_clipping_picks_each_groups_least_output_error(ratios_per_call, monkeypatch):
    """Against a brute force over every (row, group): the shrink ratio whose round trip has
    the least d^T H d, and the weights clamped to that range; with the grid's scales made
    in one call, one per ratio, or in uneven chunks (25 ratios, 7 a call)."""
    from llmc_awq import clip
    from llmc_awq.clip import GroupMoments, clip_weight

    if ratios_per_call is not None:  # 6 rows x 2 groups of ranges per ratio
        monkeypatch.setattr(clip, "QPARAMS_PER_CALL", ratios_per_call * 12)

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 256, generator=g)
    weight[:, 7] *= 8  # an outlier column: clipping it pays off in some rows' first group
    x = torch.randn(300, 256, generator=g) * torch.linspace(0.2, 3.0, 256)
    moments = GroupMoments(128)
    for chunk in x.split(100):
        moments.add(chunk)
    expected = (x[:, 128:].double().T @ x[:, 128:].double()).float()
    torch.testing.assert_close(moments.blocks[1], expected, rtol=1e-5, atol=1e-3)
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    clipped = weight.clone()
    ratios = clip_weight(clipped, moments.blocks, args, n_grid=50, max_shrink=0.5)
    for r in range(6):
        for k in range(2):
            w = weight[r, k * 128 : (k + 1) * 128].double()
            h = moments.blocks[k].double()
            lo, hi = float(w.min()), float(w.max())
            errors = {}
            for i in range(25):
                p = 1 - i / 50
                d = w - _int4_asym(w, lo * p, hi * p)
                errors[p] = float(d @ h @ d)
            best = min(errors, key=errors.get)
            assert ratios[r, k].item() == pytest.approx(best)
            torch.testing.assert_close(clipped[r, k * 128 : (k + 1) * 128].double(), w.clamp(lo * best, hi * best))
    assert (ratios < 1).all() and len(set(ratios.flatten().tolist())) > 3  # chosen group by group


def test_clipping_follows_the_quantizer(llama_path, tmp_path, caplog):
    """On by default when the weights are then rounded to nearest (AWQ alone, or before a
    QuantizationModifier); off before GPTQ, which solves for the unclipped weights."""
    def run(recipe: str, name: str) -> dict:
        oneshot(model=str(llama_path), recipe=recipe, output_dir=str(tmp_path / name), **DATA)
        return load_file(tmp_path / name / "model.safetensors")

    stage = "quant_stage:\n  quant_modifiers:\n"
    alone = run(stage + "    AWQModifier: {n_grid: 2, ignore: [lm_head]}\n", "alone")
    unclipped = run(stage + "    AWQModifier: {n_grid: 2, ignore: [lm_head], apply_clip: false}\n", "unclipped")
    key = "model.layers.0.mlp.down_proj.weight_scale"
    assert (alone[key] <= unclipped[key]).all() and (alone[key] < unclipped[key]).any()  # narrower ranges


@needs("llmc_gptq")
def test_clipping_is_off_before_gptq(llama_path, tmp_path):
    def run(recipe: str, name: str) -> dict:
        oneshot(model=str(llama_path), recipe=recipe, output_dir=str(tmp_path / name), **DATA)
        return load_file(tmp_path / name / "model.safetensors")

    stage = "quant_stage:\n  quant_modifiers:\n"
    gptq = "    GPTQModifier: {targets: [Linear], scheme: W4A16_ASYM, ignore: [lm_head]}\n"
    auto = run(stage + "    AWQModifier: {n_grid: 2}\n" + gptq, "gptq-auto")
    off = run(stage + "    AWQModifier: {n_grid: 2, apply_clip: false}\n" + gptq, "gptq-off")
    assert all(torch.equal(auto[k], off[k]) for k in auto)


# --- use_loss_mask --------------------------------------------------------------------------


def _masked_dataset(masks: list[list[int]]):
    import datasets

    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(4, 2048, (len(m),), generator=g).tolist() for m in masks]
    return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks})


@pytest.mark.parametrize("pipeline", ["sequential", "basic"])
def test_the_pipelines_hand_each_batch_its_loss_mask(llama_path, pipeline):
    from llmc.hookspecs import hookimpl
    from llmc.plugins import get_plugin_manager

    masks = [[0] * 6 + [1] * 10, [1] * 16, [0] * 12 + [1] * 4]
    seen: list[tuple[int, list]] = []

    class Probe:
        @hookimpl
        def llmc_batch_end(self, state, batch_index):
            seen.append((batch_index, state.loss_mask.tolist()))

    pm, probe = get_plugin_manager(), Probe()
    pm.register(probe, name="loss-mask-probe")
    try:
        oneshot(model=str(llama_path), dataset=_masked_dataset(masks), use_loss_mask=True, pipeline=pipeline,
                recipe=quant_recipe_awq(), num_calibration_samples=3, max_seq_length=16,
                shuffle_calibration_samples=False)
    finally:
        pm.unregister(probe)
    assert seen and all(mask == [masks[index]] for index, mask in seen)
    assert {index for index, _ in seen} == {0, 1, 2}


def quant_recipe_awq(**extra) -> dict:
    return {"s": {"quant_modifiers": {"AWQModifier": {"n_grid": 4, "ignore": ["lm_head"], **extra}}}}


def test_awq_counts_only_the_masked_tokens(llama_path, tmp_path):
    def run(masks: list[list[int]], name: str, **kw) -> dict:
        oneshot(model=str(llama_path), dataset=_masked_dataset(masks), recipe=quant_recipe_awq(),
                output_dir=str(tmp_path / name), num_calibration_samples=len(masks), max_seq_length=16,
                shuffle_calibration_samples=False, **kw)
        return load_file(tmp_path / name / "model.safetensors")

    full = [[1] * 16] * 4
    half = [[0] * 8 + [1] * 8] * 4
    plain = run(full, "plain")
    ones = run(full, "ones", use_loss_mask=True)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)  # a mask of ones changes nothing
    masked = run(half, "masked", use_loss_mask=True)
    unmasked = run(half, "unmasked")  # the same data, every token counted
    key = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(masked[key], unmasked[key])
    # a sample whose mask keeps no token (a prompt longer than max_seq_length) adds nothing
    empty = run(half + [[0] * 16], "empty", use_loss_mask=True)
    assert all(torch.equal(masked[k], empty[k]) for k in masked)
    with pytest.raises(ValueError, match="loss_mask"):
        oneshot(model=str(llama_path), dataset="llmc-docs", use_loss_mask=True, recipe=quant_recipe_awq(),
                num_calibration_samples=2, max_seq_length=16)


def test_masked_tokens_keeps_the_rows_the_mask_keeps():
    from llmc_awq.modifier import masked_tokens

    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(masked_tokens(x, mask), torch.stack([x[0, 0], x[0, 2], x[1, 2]]))
    assert masked_tokens(x, None).shape == (6, 4)
    assert masked_tokens(x[0], mask).shape == (3, 4)  # not laid out by the batch: every row
