"""Moving weights and activations to the GPU and back: exact round trips, edits kept."""

from __future__ import annotations

import pytest
import torch

from llmc_pipelines.onloading import Onloader, lazily_onloaded
from llmc_pipelines.transfers import Chunk, Transfers, batches

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="moving to an accelerator needs one"
)


def _blocks(n: int) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    blocks = []
    for _ in range(n):
        block = torch.nn.Sequential(
            torch.nn.Linear(48, 40), torch.nn.LayerNorm(40, dtype=torch.bfloat16)
        )
        block.register_buffer("steps", torch.arange(7, dtype=torch.int64))
        block.register_buffer("mask", torch.tensor([True, False, True]))
        block.tied = block[0]  # the same module reached twice: its tensors move once
        blocks.append(block)
    return blocks


@cuda
def test_onloader_moves_one_block_at_a_time_and_keeps_every_edit():
    blocks = _blocks(4)
    original = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    expected = [dict(state) for state in original]  # what each block holds when its turn comes
    params = [list(b.parameters()) for b in blocks]
    homes = [{k: v.data_ptr() for k, v in b.state_dict().items()} for b in blocks]
    onloader = Onloader(blocks, torch.device("cuda"))  # stages the first block at once
    blocks[0][1].bias.data = torch.full((40,), 5.0, dtype=torch.bfloat16)  # replaced since
    expected[0]["1.bias"] = blocks[0][1].bias.data.clone()
    for index, block in enumerate(blocks):
        with onloader.onloaded(index):
            on_device = [any(t.is_cuda for t in b.state_dict().values()) for b in blocks]
            assert on_device == [i == index for i in range(len(blocks))]
            for key, value in block.state_dict().items():
                assert torch.equal(value.cpu(), expected[index][key]), (index, key)
            onloader.settle()
            block[0].weight.data.mul_(2)  # edited in place: comes home through staging
            block[0].bias.data = block[0].bias.data.double()  # replaced: comes home on its own
            if index + 1 < len(blocks):  # replaced after the next block was staged: staged again
                norm = torch.full((40,), 3.0, dtype=torch.bfloat16)
                blocks[index + 1][1].weight.data = norm
                expected[index + 1]["1.weight"] = norm.clone()
    onloader.close()
    for index, block in enumerate(blocks):
        assert list(block.parameters()) == params[index]  # the same Parameter objects
        state = block.state_dict()
        assert not any(t.is_cuda for t in state.values())
        for key in ("0.weight", "steps", "mask"):  # written back where they came from
            assert state[key].data_ptr() == homes[index][key], (index, key)
        assert torch.equal(state["0.weight"], original[index]["0.weight"] * 2)
        assert state["0.bias"].dtype == torch.float64
        assert torch.equal(state["0.bias"], original[index]["0.bias"].double())
        for key in ("1.weight", "1.bias", "steps", "mask"):
            assert torch.equal(state[key], expected[index][key]), (index, key)


@cuda
def test_modules_run_around_the_layers_get_their_own_memory_back():
    torch.manual_seed(0)
    first, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    before = {name: (t.data_ptr(), t.clone()) for name, t in [*first.named_parameters(), ("head", head.weight)]}
    device = torch.device("cuda")
    with lazily_onloaded([first, head], device):
        assert first.weight.device.type == "cpu"  # until it runs
        first(torch.zeros(2, 4, device=device))
        assert first.weight.is_cuda and not head.weight.is_cuda  # only what ran moved
        first.bias.data = torch.ones(4, device=device)  # replaced meanwhile: moves home
    assert first.bias.device.type == "cpu" and torch.equal(first.bias, torch.ones(4))
    for name, tensor in [("weight", first.weight), ("head", head.weight)]:
        assert tensor.device.type == "cpu" and tensor.data_ptr() == before[name][0]
        assert torch.equal(tensor, before[name][1])


@cuda
def test_onloader_leaves_weights_already_on_the_device_alone():
    blocks = [b.cuda() for b in _blocks(2)]
    weights = [b[0].weight.data for b in blocks]
    onloader = Onloader(blocks, torch.device("cuda"))
    for index in range(2):
        with onloader.onloaded(index):
            pass
    onloader.close()
    assert all(
        b[0].weight.data.data_ptr() == w.data_ptr() for b, w in zip(blocks, weights, strict=True)
    )


@cuda
@pytest.mark.parametrize("hidden_size", [4, 2**20])  # many batches per chunk, and one
def test_chunked_transfers_match_the_cpu_and_store_in_place(hidden_size):
    transfers = Transfers(torch.device("cuda"), torch.device("cpu"))
    call = ((), {"scale": transfers.to_offload(torch.tensor(2.0, device="cuda"))})
    hidden = []
    for i in range(19):
        transfers.append(hidden, torch.full((3, hidden_size), float(i), device="cuda"))
    transfers.synchronize()
    assert len(hidden) == (3 if hidden_size == 4 else 19)  # 8 batches a chunk, or 12 MiB alone
    buffers = [h.data_ptr() for h in batches(hidden)]
    seen, kept = [], []

    def fn(index, h, loaded):
        assert h.is_cuda and loaded[1]["scale"].is_cuda
        seen.append(id(loaded))
        kept.append(h)  # as a modifier caching a layer's inputs would
        out = h * loaded[1]["scale"] + index
        return out if index % 7 else out[:, :2]  # another shape: its chunk moves to new buffers

    outputs = transfers.forward(hidden, [call] * 19, fn, store=True)
    transfers.synchronize()
    assert len(set(seen)) == 1 and len(batches(outputs)) == 19
    odd = {i for i in range(19) if i % 7 == 0}
    index = 0
    for chunk in outputs:
        in_place = not odd & set(range(index, index + len(chunk)))
        for h in chunk.batches:
            assert h.device.type == "cpu" and h.is_pinned()
            assert (h.data_ptr() == buffers[index]) == in_place  # the input's buffer, overwritten
            expected = torch.full((3, hidden_size), 3.0 * index)
            torch.testing.assert_close(h, expected if index % 7 else expected[:, :2])
            index += 1
    for index, h in enumerate(kept):  # what the layer saw is never overwritten
        torch.testing.assert_close(h.cpu(), torch.full((3, hidden_size), float(index)))
    assert transfers.forward(outputs, [call] * 19, fn, store=False) is None


@cuda
@pytest.mark.parametrize("hidden_size", [4, 2**20])
def test_loads_never_overwrite_inputs_the_compute_stream_still_reads(hidden_size):
    """The launching thread runs ahead of a slow device: device buffers freed after a batch's
    kernels were queued get reused for later loads, which must not overwrite them early."""
    transfers = Transfers(torch.device("cuda"), torch.device("cpu"))
    hidden = []
    for i in range(40):
        transfers.append(hidden, torch.full((3, hidden_size), float(i), device="cuda"))
    transfers.synchronize()

    def fn(index, h, call):
        torch.cuda._sleep(2_000_000)  # the compute stream lags the launches by milliseconds
        return h + 0.5

    calls = [((), {})] * 40
    outputs = transfers.forward(hidden, calls, fn, store=True)
    # the next pass loads each chunk only once its store is done, with no synchronisation between
    outputs = transfers.forward(outputs, calls, fn, store=True)
    transfers.synchronize()
    for index, out in enumerate(batches(outputs)):
        torch.testing.assert_close(out, torch.full((3, hidden_size), index + 1.0))


@cuda
def test_a_pass_loads_each_batch_only_after_the_last_pass_stored_it():
    """The stores of one pass can trail its compute (here: the store stream is held up);
    the next pass must not load a chunk's buffer before its store landed there."""
    transfers = Transfers(torch.device("cuda"), torch.device("cpu"))
    hidden = []
    for i in range(12):
        transfers.append(hidden, torch.full((3, 2**18), float(i), device="cuda"))
    transfers.synchronize()

    def slow_stores(index, h, call):
        if index == 0:
            with torch.cuda.stream(transfers.stores):
                torch.cuda._sleep(50_000_000)  # tens of milliseconds before any store lands
        return h + 0.5

    calls = [((), {})] * 12
    outputs = transfers.forward(hidden, calls, slow_stores, store=True)
    outputs = transfers.forward(outputs, calls, lambda index, h, call: h + 0.5, store=True)
    transfers.synchronize()
    for index, out in enumerate(batches(outputs)):
        torch.testing.assert_close(out, torch.full((3, 2**18), index + 1.0))


@pytest.mark.parametrize("shapes", [[(2, 3)] * 3, [(2, 3), (1, 3), (2, 3)]])
def test_a_packed_chunk_splits_a_copy_of_its_buffer_into_its_batches(shapes):
    """One shape for every batch splits in one call, mixed shapes one by one: same batches."""
    like = [
        torch.arange(6 * i, 6 * i + torch.Size(s).numel(), dtype=torch.float32).view(s)
        for i, s in enumerate(shapes)
    ]
    chunk = Chunk.packed(like, torch.device("cpu"), pinned=False, room=6)
    for batch, source in zip(chunk.batches, like, strict=True):
        batch.copy_(source)
    assert (chunk.shape is not None) == (len(set(shapes)) == 1)
    copy = chunk.flat[: chunk.size].clone()  # as a load to the execution device gives it
    views = chunk.views(copy)
    assert [v.shape for v in views] == [torch.Size(s) for s in shapes]
    for view, source in zip(views, like, strict=True):
        assert torch.equal(view, source)
        assert view.data_ptr() != source.data_ptr()  # views of the copy, not of the chunk
    assert chunk.fits(like[0]) and not chunk.fits(like[0].double())


def test_onloader_pins_both_buffers_before_the_first_turn_without_torch_pinning(monkeypatch):
    """The first job makes both staging buffers, sized for the first two targets, from
    registered slabs (``cudaHostRegister``, stood in for here), then stages the first
    target: no memory is pinned later, while the capture launches kernels. ``close``
    unregisters them."""
    import threading

    registered: dict[int, tuple[int, str]] = {}

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            registered[ptr] = (size, threading.current_thread().name)
            return 0

        def cudaHostUnregister(self, ptr):
            del registered[ptr]
            return 0

    def no_torch_pinning(*args, pin_memory=False, **kwargs):
        assert not pin_memory, "pinned through torch's cudaHostAlloc"
        return real_empty(*args, **kwargs)

    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch, "empty", no_torch_pinning)
    blocks = [torch.nn.Linear(64, 48 * (i + 1)) for i in range(3)]  # sizes differ per target
    onloader = Onloader(blocks, torch.device("cuda", 0))
    layout = onloader._staged[0].result()
    assert len(registered) == 2 and {t for _, t in registered.values()} == {"llmc-onload_0"}
    for slot, block in enumerate(blocks[:2]):
        buffer = onloader._buffers[slot]
        assert buffer.untyped_storage().data_ptr() in registered
        assert buffer.numel() >= sum(t.numel() * t.element_size() for t in block.parameters())
    assert layout.buffer is onloader._buffers[0]
    for staged, tensor in zip(layout.views(layout.buffer), layout.tensors, strict=True):
        assert torch.equal(staged, tensor)
    onloader.close()
    assert not registered
