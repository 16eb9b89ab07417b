"""Pipelines: sequential and basic see the same calibration data; sequential onloads one layer."""

from __future__ import annotations

import logging
import re

import attrs
import pytest
import torch
from transformers import AutoConfig

from llmc import oneshot
from llmc.api import input_only
from llmc.hookspecs import hookimpl
from llmc.modifiers import Modifier
from llmc.modifiers.quantization import QuantizationModifier
from llmc.plugins import get_plugin_manager

DATA = dict(
    dataset="llmc-docs",
    num_calibration_samples=6,
    max_seq_length=40,
    batch_size=2,
    pad_to_max_length=False,
    data_collator="padding",
)


@attrs.define(kw_only=True)
class GramModifier(Modifier):
    """Accumulates X^T X of every Linear input inside the decoder layers (a GPTQ-like statistic)."""

    mark_input_only: bool = True  # its hooks only read the input (llmc.api.input_only)
    grams: dict[str, torch.Tensor] = attrs.field(factory=dict, init=False)
    batches: int = attrs.field(default=0, init=False)
    _handles: list = attrs.field(factory=list, init=False)

    def on_batch_end(self, state, batch_index) -> None:
        self.batches += 1

    def on_calibration_start(self, state) -> None:
        for name, module in state.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:

                def hook(mod, args, name=name):
                    if not state.observing:
                        return
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    self.grams[name] = self.grams.get(name, 0) + x.T @ x

                if self.mark_input_only:
                    hook = input_only(hook)
                self._handles.append(module.register_forward_pre_hook(hook))

    def on_calibration_end(self, state) -> None:
        for h in self._handles:
            h.remove()


def _grams(path, pipeline, qac, quantize, data=DATA):
    gram = GramModifier()
    recipe = ([QuantizationModifier(scheme="W4A16", ignore=["lm_head"])] if quantize else []) + [
        gram
    ]
    oneshot(
        model=str(path),
        recipe=recipe,
        pipeline=pipeline,
        quantization_aware_calibration=qac,
        **data,
    )
    return gram.grams


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("qac", [True, False])
def test_sequential_matches_basic(checkpoint_factory, arch, qac):
    path = checkpoint_factory(arch)
    basic = _grams(path, "basic", qac, quantize=True)
    sequential = _grams(path, "sequential", qac, quantize=True)
    assert basic.keys() == sequential.keys() and len(basic) == 14
    for name in basic:
        torch.testing.assert_close(sequential[name], basic[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize("qac", [True, False])
def test_calibration_pass_stops_after_the_last_observed_module(llama_path, monkeypatch, qac, marked):
    """With quantization-aware calibration the calibration pass's outputs are thrown away: after
    the first batch, each layer's pass stops at the last hooked module (the down projection's
    input), so its product never runs; without it, those outputs feed the next layer and the
    pass runs whole, except on the last layer, whose outputs nothing reads. A pre-hook not
    marked input-only may prepare the module's forward: the pass then stops after it. The
    observed statistics are the same either way (see above)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    down = {id(m.weight): name for name, m in model.named_modules() if name.endswith("mlp.down_proj")}
    calls = {}
    linear = torch.nn.functional.linear

    def counted(x, weight, *args, **kwargs):
        if id(weight) in down:
            calls[down[id(weight)]] = calls.get(down[id(weight)], 0) + 1
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    gram = GramModifier(mark_input_only=marked)
    oneshot(model=model, recipe=[QuantizationModifier(scheme="W4A16", ignore=["lm_head"]), gram],
            pipeline="sequential", quantization_aware_calibration=qac, **DATA)
    batches = 3  # 6 samples, 2 per batch
    assert len(gram.grams) == 14 and gram.batches == 2 * batches
    if not marked:  # every calibration pass runs the down projection
        assert calls == {"model.layers.0.mlp.down_proj": batches * (2 if qac else 1), "model.layers.1.mlp.down_proj": batches}
    elif qac:  # layer 0: batch 0 whole, then the propagation pass; the last layer: batch 0 alone
        assert calls == {"model.layers.0.mlp.down_proj": 1 + batches, "model.layers.1.mlp.down_proj": 1}
    else:
        assert calls == {"model.layers.0.mlp.down_proj": batches, "model.layers.1.mlp.down_proj": 1}


def test_quantization_aware_calibration_changes_what_later_layers_see(llama_path):
    aware = _grams(llama_path, "sequential", True, quantize=True)
    unaware = _grams(llama_path, "sequential", False, quantize=True)
    late = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(aware[late], unaware[late])
    plain = _grams(llama_path, "sequential", False, quantize=False)
    torch.testing.assert_close(unaware[late], plain[late])


@pytest.mark.parametrize("qac", [True, False])
def test_static_observers_agree_between_pipelines(llama_path, qac):
    """Observed FP8 input scales agree. With quantization-aware calibration, layers after the
    first legitimately differ: basic runs each batch with the running scale estimate, sequential
    propagates with the final scales of the layer before."""
    scales = {}
    for pipeline in ("basic", "sequential"):
        model = oneshot(
            model=str(llama_path),
            recipe=QuantizationModifier(scheme="FP8", ignore=["lm_head"]),
            pipeline=pipeline,
            quantization_aware_calibration=qac,
            **DATA,
        )
        scales[pipeline] = {
            n: m.input_scale.clone() for n, m in model.named_modules() if hasattr(m, "input_scale")
        }
    assert len(scales["basic"]) == 14
    for name, value in scales["basic"].items():
        if qac and not name.startswith("model.layers.0."):
            continue
        torch.testing.assert_close(scales["sequential"][name], value, msg=name)


def test_sequential_asks_for_one_layer_at_a_time(llama_path, monkeypatch):
    """The pipeline asks the onloader for each layer once and never for two at a time. On the
    CPU the onloader moves nothing, so this checks only the requests; what stays on the device
    is measured by test_cuda_holds_one_layer_and_matches_basic on a GPU."""
    import contextlib

    from llmc_pipelines.onloading import Onloader

    resident: set[int] = set()
    peak = []
    real = Onloader.onloaded

    @contextlib.contextmanager
    def counting(self, index):
        resident.add(index)
        peak.append(len(resident))
        with real(self, index):
            yield
        resident.discard(index)

    monkeypatch.setattr(Onloader, "onloaded", counting)
    oneshot(
        model=str(llama_path),
        recipe=QuantizationModifier(scheme="FP8", ignore=["lm_head"]),
        pipeline="sequential",
        **DATA,
    )
    assert len(peak) == 2 and max(peak) == 1  # two layers, each onloaded once, alone


def test_the_capture_starts_once_its_pinned_memory_is_ready(llama_path, monkeypatch):
    """Registering pinned memory while the capture launches kernels stalls them: the
    capture's first batch waits for the slabs the capture is expected to fill."""
    import contextlib
    import threading
    import time

    from llmc_pipelines.sequential import Capture
    from llmc_pipelines.transfers import Transfers

    ready_at, first_batch = [], []

    @contextlib.contextmanager
    def capturing(self, expected_bytes=0):
        prepared = threading.Event()

        def register() -> None:
            time.sleep(0.3)
            ready_at.append(time.monotonic())
            prepared.set()

        thread = threading.Thread(target=register)
        thread.start()
        yield prepared
        thread.join()

    real_batch = Capture.batch

    def batch(self, data):
        first_batch.append(time.monotonic())
        return real_batch(self, data)

    monkeypatch.setattr(Transfers, "capturing", capturing)
    monkeypatch.setattr(Capture, "batch", batch)
    oneshot(
        model=str(llama_path),
        recipe=QuantizationModifier(scheme="FP8", ignore=["lm_head"]),
        pipeline="sequential",
        **DATA,
    )
    assert len(ready_at) == 1 and first_batch and first_batch[0] >= ready_at[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="onloading to an accelerator needs one")
@pytest.mark.parametrize("qac", [False, True])
def test_cuda_holds_one_layer_and_matches_basic(tmp_path, qac):
    """A model on the CPU calibrates on CUDA with one layer there at a time, returns home
    entirely, and sees the same statistics as the basic pipeline on the CPU (activations
    cached on the CPU: outputs come back in one pass, or in a second one)."""
    from transformers import AutoModelForCausalLM

    from llmc import tiny

    path = tiny.save_tiny(tmp_path, num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(path)
    on_device = []

    def count(module, args):
        on_device.append(
            sum(any(p.is_cuda for p in layer.parameters()) for layer in model.model.layers)
        )

    for layer in model.model.layers:
        layer.register_forward_pre_hook(count)
    gram = GramModifier()
    oneshot(
        model=model,
        recipe=[gram],
        pipeline="sequential",
        device="cuda",
        quantization_aware_calibration=qac,
        **DATA,
    )
    assert max(on_device) == 1 and len(on_device) > 4
    assert not any(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    reference = GramModifier()
    oneshot(model=str(path), recipe=[reference], pipeline="basic", device="cpu", **DATA)
    assert len(reference.grams) == 28
    for name, expected in reference.grams.items():
        torch.testing.assert_close(gram.grams[name].cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="onloading to an accelerator needs one")
def test_repeated_runs_leave_no_device_memory_reserved(tmp_path):
    """Each run's copy streams are new: what their pools cached is released, not kept for them."""
    from llmc import tiny

    path = tiny.save_tiny(tmp_path, num_hidden_layers=2)
    reserved = []
    for _ in range(3):
        oneshot(model=str(path), recipe=[GramModifier()], pipeline="sequential", device="cuda", **DATA)
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[2] <= reserved[0], reserved


@attrs.define(kw_only=True)
class HalveDownProj(Modifier):
    """Edits each layer's weights in place at its layer end, as a compressing modifier would."""

    def pipeline(self) -> str:
        return "sequential"

    def on_sequential_layer_end(self, state, layer_name, layer) -> None:
        layer.mlp.down_proj.weight.data.mul_(0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="onloading to an accelerator needs one")
def test_weights_edited_on_cuda_come_home_and_the_checkpoint_is_untouched(tmp_path):
    """Onloaded weights go back into the CPU memory they came from, which from_pretrained may
    map from the checkpoint's files: the edits reach the model, never the files."""
    import hashlib

    from transformers import AutoModelForCausalLM

    from llmc import tiny

    path = tiny.save_tiny(tmp_path, num_hidden_layers=3)
    files = sorted(path.glob("*.safetensors"))
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    model = AutoModelForCausalLM.from_pretrained(path)
    before = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    oneshot(model=model, recipe=[HalveDownProj()], pipeline="sequential", device="cuda", **DATA)
    for layer, weight in zip(model.model.layers, before, strict=True):
        assert not layer.mlp.down_proj.weight.is_cuda
        torch.testing.assert_close(layer.mlp.down_proj.weight.detach(), weight * 0.5)
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == digests


@attrs.define(kw_only=True)
class LayerWatcher(Modifier):
    """Counts each decoder layer's calls and keeps (without copying) the inputs it observed."""

    calls: dict[int, int] = attrs.field(factory=dict, init=False)
    kept: list = attrs.field(factory=list, init=False)
    events: list[tuple[int, bool]] = attrs.field(factory=list, init=False)  # (layer, observing) per call
    _handles: list = attrs.field(factory=list, init=False)

    def pipeline(self) -> str:
        return "sequential"

    def on_calibration_start(self, state) -> None:
        for index, layer in enumerate(state.model.model.layers):

            def hook(module, args, kwargs, index=index):
                self.calls[index] = self.calls.get(index, 0) + 1
                self.events.append((index, state.observing))
                hidden = args[0] if args else kwargs["hidden_states"]
                if state.observing:
                    self.kept.append((hidden, hidden.clone()))

            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def on_calibration_end(self, state) -> None:
        for h in self._handles:
            h.remove()


@pytest.mark.parametrize("qac", [True, False])
def test_last_layer_runs_once_and_kept_inputs_stay_intact(llama_path, qac):
    watcher = LayerWatcher()
    oneshot(model=str(llama_path), recipe=[watcher], quantization_aware_calibration=qac, **DATA)
    batches = -(-DATA["num_calibration_samples"] // DATA["batch_size"])
    last = max(watcher.calls)
    # while capturing, every layer is called on the first batch and the first layer on every
    # batch (the layers share their arguments); then one call calibrating, and with
    # quantization-aware calibration one more to feed the next layer, except for the last layer
    capture = {i: batches if i == 0 else 1 for i in range(last + 1)}
    runs = {i: capture[i] + batches * (2 if qac and i < last else 1) for i in range(last + 1)}
    assert watcher.calls == runs
    # observed (state.observing): each layer once per batch, in its calibration pass only,
    # neither while its calls are captured nor while it propagates
    assert len(watcher.kept) == batches * (last + 1)
    for hidden, copy in watcher.kept:  # the pipeline never reuses the memory a layer was given
        assert torch.equal(hidden, copy)


@pytest.mark.parametrize("qac", [True, False])
def test_first_layer_is_calibrated_on_each_batch_as_it_is_captured(llama_path, qac, monkeypatch):
    """The first layer's calibration call on a batch comes right after that batch's capture,
    not after every batch's; without quantization-aware calibration nothing reads the first
    layer's inputs after that call, and the capture stores none of them."""
    from llmc_pipelines import sequential
    from llmc_pipelines.transfers import batches as stored_batches

    stored = []
    real_exit = sequential.Capture.__exit__

    def exit_counting(self, *exc):
        stored.append(len(stored_batches(self.hidden)))
        return real_exit(self, *exc)

    monkeypatch.setattr(sequential.Capture, "__exit__", exit_counting)
    watcher = LayerWatcher()
    oneshot(model=str(llama_path), recipe=[watcher], quantization_aware_calibration=qac, **DATA)
    batches = -(-DATA["num_calibration_samples"] // DATA["batch_size"])
    first = [observing for index, observing in watcher.events if index == 0]
    propagation = [False] * batches if qac else []
    assert first == [False, True] * batches + propagation
    assert stored == [batches if qac else 0]


class BatchCounter:
    """A plugin (no modifier) that counts batch-end events."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    @hookimpl
    def llmc_batch_end(self, state, batch_index) -> None:
        self.batches.append(batch_index)


@pytest.mark.parametrize("qac", [True, False])
def test_batch_end_reaches_plugins_and_modifiers_for_every_layer_and_batch(llama_path, qac):
    """The pipeline calls the per-batch event only when something implements it: a plugin that
    is no modifier, or a modifier, gets every batch of every layer's calibration pass (not the
    passes that only propagate)."""
    batches = -(-DATA["num_calibration_samples"] // DATA["batch_size"])
    layers = AutoConfig.from_pretrained(llama_path).num_hidden_layers
    run = dict(model=str(llama_path), pipeline="sequential", quantization_aware_calibration=qac)
    counter, pm = BatchCounter(), get_plugin_manager()
    pm.register(counter, name="batch-counter")
    try:
        oneshot(recipe=[LayerWatcher()], **run, **DATA)
    finally:
        pm.unregister(counter)
    assert counter.batches == list(range(batches)) * layers
    gram = GramModifier()
    oneshot(recipe=[gram], **run, **DATA)
    assert gram.batches == batches * layers


def test_bad_sequential_targets_name_the_classes(llama_path):
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        oneshot(
            model=str(llama_path),
            recipe=QuantizationModifier(scheme="FP8"),
            pipeline="sequential",
            sequential_targets=["NoSuchLayer"],
            **DATA,
        )


def test_targets_inside_the_layers_calibrate_whole_layers(llama_path, caplog):
    """llm-compressor's DeepSeek recipe names the attention and the MLP (sub-layer subgraphs
    there): llmc calibrates the decoder layers holding them, as with its default targets."""
    from transformers import AutoModelForCausalLM

    from llmc_pipelines.sequential import sequential_targets

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    with caplog.at_level("INFO", logger="llmc_pipelines"):
        layers = sequential_targets(model, ["LlamaAttention", "LlamaMLP"])
    assert [name for name, _ in layers] == ["model.layers.0", "model.layers.1"]
    assert "calibrates one whole LlamaDecoderLayer at a time" in caplog.text
    assert [name for name, _ in sequential_targets(model, ["re:.*mlp.up_proj$"])] == ["model.layers.0", "model.layers.1"]
    grams = []
    for targets in (["LlamaAttention", "LlamaMLP"], None):
        gram = GramModifier()
        oneshot(model=str(llama_path), recipe=[gram], pipeline="sequential", sequential_targets=targets, **DATA)
        grams.append(gram.grams)
    assert grams[0].keys() == grams[1].keys() and all(torch.equal(grams[0][k], grams[1][k]) for k in grams[0])


def test_shared_layers_are_refused_with_a_clear_message(llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    model.model.layers[1] = model.model.layers[0]  # one block applied twice (weight sharing)
    with pytest.raises(ValueError, match="model.layers.0 is shared.*pipeline='basic'"):
        oneshot(
            model=model, recipe=QuantizationModifier(scheme="FP8"), pipeline="sequential", **DATA
        )


def test_streamed_dataset_is_sampled(llama_path):
    """An IterableDataset (what streaming=True yields) is shuffled with a buffer and truncated."""
    import datasets

    texts = [f"Streaming sample {i}: " + "words of calibration text " * 5 for i in range(40)]
    stream = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    gram = GramModifier()
    oneshot(
        model=str(llama_path),
        recipe=[gram],
        pipeline="basic",
        dataset=stream,
        num_calibration_samples=5,
        max_seq_length=32,
        pad_to_max_length=False,
    )
    assert gram.batches == 5  # num_calibration_samples honoured on a stream
    assert gram.grams["model.layers.0.self_attn.q_proj"].abs().sum() > 0


def test_arguments_repeated_across_batches_are_stored_and_loaded_once():
    from llmc_pipelines.transfers import Transfers, same_tree

    transfers = Transfers(torch.device("cpu"), torch.device("cpu"))
    latest: dict = {}

    def arguments(i, mask):  # cos and sin: same shape and dtype, different values
        cos, sin = torch.arange(6.0).reshape(2, 3), -torch.arange(6.0).reshape(2, 3)
        return ((), {"position_embeddings": (cos, sin), "mask": torch.full((2, 2), float(mask))})

    stored = [transfers.offload_arguments(arguments(i, i), {}, latest)[1] for i in range(3)]
    rotary = [s["position_embeddings"] for s in stored]
    assert rotary[0][0] is rotary[1][0] is rotary[2][0] and rotary[0][1] is rotary[2][1]
    torch.testing.assert_close(rotary[2][1], -torch.arange(6.0).reshape(2, 3))
    assert len({id(s["mask"]) for s in stored}) == 3  # different in every batch
    assert not same_tree(stored[0], stored[1])
    repeated = transfers.offload_arguments(arguments(3, 2), {}, latest)[1]
    assert same_tree(repeated, stored[2])  # every tensor equal to the last batch's: one call


def test_equal_answers_as_torch_equal_for_each_pair():
    """NaN unequal to itself, empty tensors equal, signed zeros equal, any dtype; the same
    from the comparison read back at once (what runs on CUDA, run here on the CPU)."""
    from llmc_pipelines.transfers import _equal_at_once, equal

    nan = torch.tensor([1.0, float("nan")])
    pairs = [
        (nan, nan),
        (torch.empty(0, 3), torch.empty(0, 3)),
        (torch.tensor([True, False]), torch.tensor([True, True])),
        (torch.arange(5), torch.arange(5)),
        (torch.zeros(2, 2, dtype=torch.bfloat16), -torch.zeros(2, 2, dtype=torch.bfloat16)),
        (torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3).flip(0)),
    ]
    expected = [torch.equal(a, b) for a, b in pairs]
    assert expected == [False, True, False, True, True, False]
    assert equal(pairs) == _equal_at_once(pairs) == expected
    assert equal([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the capture's CUDA path")
def test_capture_sends_batches_unchanged_and_compares_on_the_device():
    from llmc_pipelines.basic import to_device
    from llmc_pipelines.transfers import equal

    batch = {"input_ids": torch.arange(10).view(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long), "x": None}
    sent = to_device(batch, torch.device("cuda"))
    assert sent["x"] is None
    for key in ("input_ids", "attention_mask"):
        assert sent[key].is_cuda and torch.equal(sent[key].cpu(), batch[key])
    a = torch.arange(6.0, device="cuda")
    pairs = [(a, a.clone()), (a, a.flip(0)), (a.bool(), a.bool())]
    assert equal(pairs) == [torch.equal(x, y) for x, y in pairs] == [True, False, True]


def test_forward_loads_a_shared_call_once_and_returns_outputs():
    from llmc_pipelines.transfers import Transfers, batches

    transfers = Transfers(torch.device("cpu"), torch.device("cpu"))
    call = ((), {"scale": torch.tensor(2.0)})
    hidden = []
    for i in range(4):
        transfers.append(hidden, torch.full((3,), float(i)))
    transfers.append(hidden, torch.full((2, 2), 4.0))  # another shape packs on
    seen = []

    def fn(index, h, loaded):
        seen.append((id(loaded), h.shape))
        return h * loaded[1]["scale"] + index

    outputs = transfers.forward(hidden, [call] * 5, fn, store=True)
    assert len({s[0] for s in seen}) == 1 and seen[-1][1] == (2, 2)
    for i, out in enumerate(batches(outputs)[:4]):
        torch.testing.assert_close(out, torch.full((3,), 3.0 * i))
    torch.testing.assert_close(batches(outputs)[4], torch.full((2, 2), 12.0))
    torch.testing.assert_close(batches(hidden)[1], torch.full((3,), 1.0))  # inputs kept
    assert transfers.forward(hidden, [call] * 5, fn, store=False) is None
    with pytest.raises(ValueError, match="4 calls for 5 batches"):
        transfers.forward(hidden, [call] * 4, fn, store=False)


def _tokenizer_path(tmp_path):
    from llmc import tiny

    tiny.build_tokenizer(2048).save_pretrained(tmp_path)
    return tmp_path


def test_encoder_decoder_with_both_stacks_targeted_is_refused_naming_one_stack(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=2048, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    model = T5ForConditionalGeneration(config)
    recipe = QuantizationModifier(scheme="FP8", ignore=["lm_head"])
    common = dict(model=model, tokenizer=_tokenizer_path(tmp_path), recipe=recipe, **DATA)
    with pytest.raises(ValueError, match=r"encoder-decoder.*re:\^encoder\\\.block\\\.\\d\+\$"):
        oneshot(pipeline="sequential", **common)
    # T5's blocks pass their position bias on: one block cannot run without the one before
    with pytest.raises(RuntimeError, match=r"position bias.*pipeline='basic'"):
        oneshot(pipeline="sequential", sequential_targets=[r"re:^encoder\.block\.\d+$"], **common)


def test_one_stack_of_an_encoder_decoder_calibrates_like_basic(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=2048,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    tokenizer = _tokenizer_path(tmp_path)
    grams = {}
    for pipeline, targets in (
        ("basic", None),
        ("sequential", [r"re:^model\.encoder\.layers\.\d+$"]),
    ):
        gram = GramModifier()
        oneshot(
            model=model,
            tokenizer=tokenizer,
            recipe=[gram],
            pipeline=pipeline,
            sequential_targets=targets,
            **DATA,
        )
        grams[pipeline] = {k: v for k, v in gram.grams.items() if ".encoder." in k}
    assert len(grams["basic"]) == 12
    for name, expected in grams["basic"].items():
        torch.testing.assert_close(grams["sequential"][name], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "tower", "blocks"),
    [
        ("qwen3_5_vl", "model.visual.blocks", 2),
        ("gemma4_vl", "model.vision_tower", 2),  # Gemma's patch embedder too
        ("llama4_vl", "vision_model", 1),  # its layers declare a tuple and return a tensor
    ],
)
def test_a_vision_tower_text_batches_do_not_run_is_left_out_like_basic(arch, tower, blocks, tmp_path, caplog):
    """A vision-language model's blocks and layers are both sequential targets (its
    _no_split_modules); text batches run the language layers only. They are calibrated as the
    basic pipeline calibrates them, and the vision tower is left out, with a log line."""
    import transformers

    from llmc import tiny

    if not hasattr(transformers, tiny.VISION_LANGUAGE[arch][0]):
        pytest.skip(f"transformers without {arch}")
    model = tiny.build_vision_language(arch)
    tokenizer = _tokenizer_path(tmp_path)
    grams = {}
    for pipeline in ("basic", "sequential"):
        gram = GramModifier()
        with caplog.at_level(logging.INFO, logger="llmc_pipelines.sequential"):
            oneshot(model=model, tokenizer=tokenizer, recipe=[gram], pipeline=pipeline, **DATA)
        grams[pipeline] = gram.grams
    assert any(re.search(r"language_model\.(model\.)?layers\.1\.", name) for name in grams["basic"])
    assert not any(name.startswith(tower) for name in grams["basic"])
    assert grams["sequential"].keys() == grams["basic"].keys()
    for name, expected in grams["basic"].items():
        torch.testing.assert_close(grams["sequential"][name], expected, rtol=1e-6, atol=1e-6)
    assert re.search(rf"do not run {re.escape(tower)}.* \({blocks} targets\)", caplog.text)


def test_modules_around_the_layers_are_observed_during_the_capture(tmp_path):
    """Gemma 4 projects its embeddings for every layer (per_layer_model_projection) before the
    first layer runs: the sequential pipeline observes it on each batch of its capture, and its
    static scale is the basic pipeline's (it had seen no data)."""
    import transformers

    from llmc import tiny

    if not hasattr(transformers, "Gemma4Config"):
        pytest.skip("transformers without Gemma 4")
    tokenizer = _tokenizer_path(tmp_path)
    name = "model.language_model.per_layer_model_projection.input_scale"
    scales = {}
    for pipeline in ("basic", "sequential"):
        model = tiny.build_vision_language("gemma4_vl")
        recipe = QuantizationModifier(scheme="FP8", ignore=["lm_head", "re:.*vision.*"])
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe, pipeline=pipeline, **DATA)
        scales[pipeline] = model.state_dict()[name]
    assert scales["basic"].item() > 0
    torch.testing.assert_close(scales["sequential"], scales["basic"], rtol=0, atol=0)


def test_outputs_layers_hand_each_other_are_carried_like_basic(tmp_path):
    """GLM-5's layers return their indexer's picks beside the hidden states, and a shared-indexer
    layer attends with the picks of the layer before: the sequential pipeline hands each layer,
    batch by batch, what the one before produced, and sees what the basic pipeline sees."""
    import transformers

    from llmc import tiny

    if not hasattr(transformers, "GlmMoeDsaConfig"):
        pytest.skip("transformers without GLM-5")
    config = tiny.build_config("glm_moe_dsa", num_hidden_layers=3, first_k_dense_replace=3,
                               indexer_types=["full", "shared", "shared"], index_topk=4)
    model = tiny.build_model(config)
    tokenizer = _tokenizer_path(tmp_path)
    grams = {}
    for pipeline in ("basic", "sequential"):
        gram = GramModifier()
        oneshot(model=model, tokenizer=tokenizer, recipe=[gram], pipeline=pipeline, **DATA)
        grams[pipeline] = gram.grams
    assert any(".layers.2." in name for name in grams["basic"])
    assert grams["sequential"].keys() == grams["basic"].keys()
    for name, expected in grams["basic"].items():
        torch.testing.assert_close(grams["sequential"][name], expected, rtol=1e-6, atol=1e-6)


def test_a_declared_tuple_the_model_passes_on_whole_is_unwrapped():
    """Llama 4's decoder layers declare a tuple and return a tensor: the capture hands back the
    declared tuple, and takes the hidden states out of it when the model passes it on whole."""
    from llmc_pipelines.carried import Carried, declared_outputs, handed_back, received

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return x, None

    hidden = torch.zeros(2)
    assert declared_outputs(Pair) == 2 and declared_outputs(torch.nn.Linear) == 1
    handed = handed_back(3, Pair(), hidden)
    assert handed[0] is hidden and handed[1] == Carried(3, 1)
    assert received(handed, hidden) is hidden and received(hidden, hidden) is hidden


def test_an_operation_between_layers_is_refused(llama_path):
    from transformers import AutoModelForCausalLM

    class Doubling(torch.nn.Module):
        """Runs between the decoder layers, outside every sequential target."""

        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states * 2

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], Doubling(), layers[1]])
    model.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match=r"between model\.layers\.0 and model\.layers\.2"):
        oneshot(model=model, recipe=[GramModifier()], pipeline="sequential", **DATA)


def _capture(model, data):
    from llmc_pipelines.sequential import Capture, sequential_targets
    from llmc_pipelines.transfers import Transfers

    layers = sequential_targets(model, None)
    cpu = torch.device("cpu")
    with torch.no_grad(), Capture(model, layers, cpu, Transfers(cpu, cpu)) as capture:
        for batch in data:
            capture.batch(batch)
    return capture


def test_capture_stops_at_the_first_layer_only_when_every_layer_shares_its_arguments():
    from llmc import tiny

    data = [{"input_ids": torch.randint(4, 2048, (1, 24))} for _ in range(3)]
    mixed = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    for arch, config, shared in [("llama", {}, True), ("qwen3", mixed, False)]:
        model = tiny.build_model(tiny.build_config(arch, num_hidden_layers=3, **config))
        calls = []
        for layer in model.model.layers:  # counts the recorders' calls too
            layer.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(m))
        capture = _capture(model, data)
        assert len(capture.calls) == 3 and all(len(c) == 3 for c in capture.calls)
        for batch_calls in capture.calls:
            assert all(c is batch_calls[0] for c in batch_calls) == shared, arch
        assert len(calls) == (3 + 1 + 1 if shared else 9), arch  # later batches stop early


def test_the_capture_bytes_estimate_is_what_the_capture_stores():
    """The pinned memory prepared before the capture: the rows' tokens times the embedding's
    width and size, exactly what the capture then stores; nothing for loaders it cannot read."""
    from torch.utils.data import DataLoader

    from llmc import tiny
    from llmc_pipelines.sequential import _capture_bytes

    model = tiny.build_model(tiny.build_config("llama", num_hidden_layers=2)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 2048, (n,), generator=g).tolist()} for n in (5, 17, 9)]
    loader = DataLoader(rows, batch_size=1, collate_fn=lambda r: {"input_ids": torch.tensor([r[0]["input_ids"]])})
    stored = sum(h.numel() * h.element_size() for chunk in _capture(model, loader).hidden for h in chunk.batches)
    assert _capture_bytes(model, loader) == stored == 31 * model.config.hidden_size * 2
    assert _capture_bytes(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]) == 0


def test_layers_with_their_own_masks_calibrate_like_basic(tmp_path):
    from llmc import tiny

    path = tiny.save_tiny(  # full attention in layer 0, a sliding window in layer 1
        tmp_path, arch="qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    basic = _grams(path, "basic", qac=True, quantize=True)
    sequential = _grams(path, "sequential", qac=True, quantize=True)
    assert basic.keys() == sequential.keys() and len(basic) == 14
    for name in basic:
        torch.testing.assert_close(sequential[name], basic[name], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned slabs are for CUDA copies")
def test_pinned_slabs_hand_out_page_locked_buffers_that_outlive_the_slabs(monkeypatch):
    """Buffers carved from registered slabs are pinned (asynchronous copies), do not overlap,
    a request larger than a slab gets a slab of its own, and after close they hold their data."""
    from llmc_pipelines import pinned

    slabs = pinned.PinnedSlabs(slab_bytes=1 << 20)
    small = [slabs.empty(1000, torch.bfloat16) for _ in range(3)]
    large = slabs.empty(1 << 20, torch.float32)
    buffers = [*small, large]
    assert all(b.is_pinned() for b in buffers)
    sources = [torch.randn(b.numel(), device="cuda").to(b.dtype) for b in buffers]
    for buffer, source in zip(buffers, sources, strict=True):
        buffer.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    slabs.close()
    for buffer, source in zip(buffers, sources, strict=True):
        assert torch.equal(buffer, source.cpu())
    # slabs nobody closed are unregistered when collected: their memory can be registered again
    for _ in range(3):
        again = pinned.PinnedSlabs(slab_bytes=1 << 20)
        assert again.empty(1 << 18, torch.float32).is_pinned()
        del again


def test_pinned_slabs_register_whole_slabs_and_always_unregister_them(monkeypatch):
    """The registration bookkeeping, with CUDA's runtime stood in for: every slab is registered
    whole (from its storage's base, which torch's is_pinned asks about), buffers are carved
    aligned and apart, and each registered range is unregistered exactly once, by close() or,
    if nobody closed, when the slabs are collected; after close, requests fall back to torch."""
    import gc

    from llmc_pipelines import pinned

    registered: dict[int, int] = {}
    events = []

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            assert ptr not in registered
            registered[ptr] = size
            events.append("register")
            return 0

        def cudaHostUnregister(self, ptr):
            del registered[ptr]
            events.append("unregister")
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    slabs = pinned.PinnedSlabs(slab_bytes=1 << 16)
    small = [slabs.empty(1000, torch.bfloat16) for _ in range(3)]
    large = slabs.empty(1 << 15, torch.float32)  # 128 KiB: a slab of its own
    assert len(registered) == 2
    for t in (*small, large):
        base = t.untyped_storage().data_ptr()
        assert base in registered and base <= t.data_ptr() and t.data_ptr() % 4096 == 0
        assert t.data_ptr() + t.numel() * t.element_size() <= base + registered[base]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in small)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    small[0].fill_(1.0)
    slabs.close()
    assert not registered and events.count("unregister") == 2
    assert small[0].eq(1.0).all()  # still valid memory
    slabs.close()  # once only
    assert events.count("unregister") == 2

    forgotten = pinned.PinnedSlabs(slab_bytes=1 << 16)
    kept = forgotten.empty(10, torch.float32)
    assert len(registered) == 1
    del forgotten
    gc.collect()
    assert not registered and kept.numel() == 10


def test_pinned_slabs_prepared_ahead_are_handed_out_in_turn_and_the_rest_released(monkeypatch):
    """Inside ``ahead`` a thread registers slabs before they are asked for: requests take them
    (a larger one still gets its own), and on leaving, the slabs nobody took are unregistered
    while those handed out stay registered until close; a refused registration on the thread
    makes later requests fall back to torch's pinning instead of waiting."""
    import threading
    import time

    from llmc_pipelines import pinned

    registered: dict[int, int] = {}
    threads: set[str] = set()
    lock = threading.Lock()
    refuse = threading.Event()

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            with lock:
                threads.add(threading.current_thread().name)
                if refuse.is_set():
                    return 1
                registered[ptr] = size
            return 0

        def cudaHostUnregister(self, ptr):
            with lock:
                del registered[ptr]
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    slabs = pinned.PinnedSlabs(slab_bytes=1 << 16)
    with slabs.ahead(3, torch.device("cpu")):
        deadline = time.monotonic() + 10
        while len(registered) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(registered) == 3  # ready before any request
        small = [slabs.empty(1 << 13, torch.float32) for _ in range(4)]  # 32 KiB each: two slabs
        large = slabs.empty(1 << 15, torch.float32)  # 128 KiB: registered here, for itself
    assert threads >= {"llmc-pinned-slabs", threading.current_thread().name}
    held = {t.untyped_storage().data_ptr() for t in (*small, large)}
    assert len(held) == 3 and set(registered) == held  # the prepared ones nobody took: gone
    slabs.close()
    assert not registered

    refuse.set()
    pinning = []  # pin_memory of each torch.empty call: torch's own pinning, stood in for
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        pinning.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    slabs = pinned.PinnedSlabs(slab_bytes=1 << 16)
    with slabs.ahead(2, torch.device("cpu")):
        fallback = slabs.empty(100, torch.float32)
    assert fallback.numel() == 100 and pinning[-1] is True and not registered


def test_huge_pages_are_asked_for_over_the_whole_2_mib_pages_inside_a_slab(monkeypatch):
    """madvise gets a 2 MiB-aligned range that lies inside the slab and leaves out less than
    a huge page at each end (a range past the slab would advise memory it does not own)."""
    import ctypes
    import sys

    from llmc_pipelines import pinned

    advised = []

    class Libc:
        def madvise(self, start, length, advice):
            advised.append((start.value, length.value, advice))
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(sys, "platform", "linux")
    huge = pinned._HUGE_PAGE
    for size in (3 * huge + 12345, 5 * huge):
        raw = torch.empty(size, dtype=torch.uint8)
        for view in (raw, raw[4096:]):
            advised.clear()
            pinned._advise_huge_pages(view)
            (start, length, advice), = advised
            begin, end = view.data_ptr(), view.data_ptr() + view.numel()
            assert advice == 14 and start % huge == 0 and length % huge == 0
            assert begin <= start < begin + huge and end - huge < start + length <= end
    advised.clear()
    pinned._advise_huge_pages(torch.empty(huge // 2, dtype=torch.uint8))  # no whole huge page
    assert not advised


def test_pinned_slabs_expected_in_total_are_registered_before_any_request(monkeypatch):
    """With ``total``, the thread registers that many slabs before the first request (and no
    more while they last), and says when they are ready; on leaving, those nobody took are
    unregistered. Refused, or closed, it says ready (nothing will come)."""
    import time

    from llmc_pipelines import pinned

    registered: set[int] = set()
    refuse = False

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            time.sleep(0.02)  # slow enough that a premature "ready" would be seen
            if refuse:
                return 1
            registered.add(ptr)
            return 0

        def cudaHostUnregister(self, ptr):
            registered.remove(ptr)
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    slabs = pinned.PinnedSlabs(slab_bytes=1 << 16)
    with slabs.ahead(1, torch.device("cpu"), total=5) as prepared:
        assert prepared.wait(10)
        assert len(registered) == 5
        assert slabs.empty(0, torch.float32).numel() == 0  # nothing to carve
        taken = [slabs.empty(1 << 14, torch.float32) for _ in range(2)]  # a slab each
        time.sleep(0.2)
        assert len(registered) == 5  # the total, then one ahead: three are still ahead
    assert registered == {t.untyped_storage().data_ptr() for t in taken}
    slabs.close()
    assert not registered

    refuse = True
    slabs = pinned.PinnedSlabs(slab_bytes=1 << 16)
    with slabs.ahead(1, torch.device("cpu"), total=5) as prepared:
        assert prepared.wait(10) and not registered
    slabs.close()
    with slabs.ahead(1, torch.device("cpu"), total=5) as prepared:  # closed: no thread
        assert prepared.is_set() and not registered


@pytest.mark.parametrize("arch, config", [("llama", {}), ("qwen3", {"head_dim": 48})])
def test_attention_warm_up_calls_attention_shaped_as_the_model_does(tmp_path, arch, config, monkeypatch):
    """The warm-up's stand-in attention call has the model's own query heads, head size, dtype
    and causality (key/value heads as the model passes them, or grouped), so it loads what the
    model's first call would; without CUDA no thread starts."""
    import transformers

    from llmc import tiny
    from llmc_pipelines import warming

    path = tiny.save_tiny(tmp_path, arch=arch, **config)  # qwen3: a head size apart from hidden / heads
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.shape, key.shape, query.dtype, kwargs.get("is_causal"), kwargs.get("enable_gqa", False)))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(torch.arange(1, 9)[None])
    (query, key, dtype, _, gqa), *_ = calls
    calls.clear()
    warming.warm_attention(model.config, model.dtype, torch.device("cpu"))
    [(warm_query, warm_key, warm_dtype, causal, warm_gqa)] = calls
    assert (warm_query[1], warm_query[3], warm_dtype, causal) == (query[1], query[3], dtype, True)
    assert warm_key[1] == key[1] or (warm_gqa and warm_key[1] == model.config.num_key_value_heads)
    assert warming.start_attention_warm_up(model, torch.device("cpu")) is None


def test_layers_of_several_kinds_on_padded_batches_calibrate_like_basic(tmp_path):
    """Qwen3.5's linear attention layers take the 2-D padding mask, its full attention layers a
    4-D causal one; an unpadded first batch gives both the same arguments, so the capture must
    not assume every layer's arguments alike from it (the full layer got the 2-D mask)."""
    import transformers

    from llmc import tiny

    if not hasattr(transformers, tiny.ARCHITECTURES["qwen3_5"][0]):
        pytest.skip("this transformers has no Qwen3.5")
    path = tiny.save_tiny(tmp_path, arch="qwen3_5")
    # one row a batch, padded to 64 tokens: the first row fills them, later ones do not
    data = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)
    basic = _grams(path, "basic", qac=True, quantize=True, data=data)
    sequential = _grams(path, "sequential", qac=True, quantize=True, data=data)
    assert basic.keys() == sequential.keys() and any("linear_attn" in n for n in basic)
    for name in basic:
        torch.testing.assert_close(sequential[name], basic[name], rtol=1e-5, atol=1e-5)
