"""Requests in sequence on one compiled model: limits, failures mid-request, long runs, and the
rule that a decode step never reads state its own prefill did not build."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from retro_compile import RetroConfig, retro_compile

from .hf_models import HandDriven, prompts, tiny_model
from .hf_models import greedy_new_tokens as greedy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = RetroConfig(mode="retro", window=2, budget=24, page_size=8, dense_layers=1, max_context=128)


def test_request_beyond_max_context_is_refused_before_any_work():
    model = retro_compile(tiny_model("llama"), CONFIG)
    ids, mask = prompts(1, 100)
    with pytest.raises(ValueError, match=r"100 tokens plus 40 new tokens need 140 positions.*RetroConfig.max_context=128"):
        greedy(model, ids, mask, 40)
    assert model.retro_state.layers() == [], "the refused request compiled or ran something"
    with pytest.raises(ValueError, match="RetroConfig.max_context=128"):  # max_length counts the prompt
        model.generate(input_ids=ids, attention_mask=mask, max_length=129, do_sample=False, pad_token_id=0)
    assert greedy(model, ids, mask, 28).shape == (1, 28)  # exactly max_context positions


@pytest.mark.parametrize("window,length", [(2, 3), (4, 5), (2, 64), (4, 63)],
                         ids=["w2-prompt-w+1", "w4-prompt-w+1", "w2-page-boundary", "w4-page-boundary-1"])
@pytest.mark.slow
def test_short_prompts_and_page_boundaries(window, length):
    """A prompt of exactly window + 1 tokens, and prompts ending on or just before a page boundary:
    full budget gives the untouched model's tokens, a small budget the hand-driven reference's."""
    model = tiny_model("llama", seed=2)
    ids, mask = prompts(2, length, pad=(0, 1) if length > 3 else (), seed=3)
    full = RetroConfig(mode="retro", window=window, budget=128, page_size=8, dense_layers=1, max_context=128)
    assert torch.equal(greedy(retro_compile(copy.deepcopy(model), full), ids, mask, 12), greedy(model, ids, mask, 12))
    small = RetroConfig(mode="retro", window=window, budget=16, page_size=8, dense_layers=1, max_context=128)
    expected, _, _ = HandDriven(copy.deepcopy(model), small).generate(ids, mask, 12)
    assert torch.equal(greedy(retro_compile(copy.deepcopy(model), small), ids, mask, 12), expected)


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.slow
def test_prompts_of_one_to_window_tokens(window):
    """A prompt of 1..window tokens, too short for a decode step's window to re-feed: at full budget
    the untouched model's tokens (one row, and two rows with one padded); at a small budget, with
    the context growing past it, the hand-driven reference's tokens for the same prompt left-padded
    by hand to window + 1 slots."""
    model = tiny_model("llama", seed=2)
    full = dataclasses.replace(CONFIG, window=window, budget=128)
    small = dataclasses.replace(CONFIG, window=window, budget=16)
    compiled_full = retro_compile(copy.deepcopy(model), full)
    compiled_small = retro_compile(copy.deepcopy(model), small)
    for length in range(1, window + 1):
        for batch, pad in ((1, ()), (2, (0, length - 1))):
            ids, mask = prompts(batch, length, pad=pad, seed=length)
            assert torch.equal(greedy(compiled_full, ids, mask, 6), greedy(model, ids, mask, 6)), (length, batch)
            lead = window + 1 - length
            padded_ids, padded_mask = (torch.cat([x.new_zeros(batch, lead), x], 1) for x in (ids, mask))
            expected, _, _ = HandDriven(copy.deepcopy(model), small).generate(padded_ids, padded_mask, 30)
            assert torch.equal(greedy(compiled_small, ids, mask, 30), expected), (length, batch)


@pytest.mark.slow
def test_exception_from_a_streamer_leaves_the_model_usable():
    class Boom(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt("the user stopped the stream")

        def end(self):
            pass

    base = tiny_model("llama", seed=4)
    ids, mask = prompts(2, 50, pad=(0, 3), seed=5)
    model = retro_compile(copy.deepcopy(base), CONFIG)
    expected = greedy(retro_compile(copy.deepcopy(base), CONFIG), ids, mask, 10)
    with pytest.raises(KeyboardInterrupt):
        greedy(model, ids, mask, 10, streamer=Boom())
    assert torch.equal(greedy(model, ids, mask, 10), expected)
    assert torch.equal(greedy(model, ids[1:], mask[1:], 10), expected[1:])


FRESH = """
import json, sys, torch
sys.path.insert(0, {root!r})
from tests.hf_models import prompts, tiny_model
from retro_compile import RetroConfig, retro_compile
model = retro_compile(tiny_model("llama", seed=6), RetroConfig(**{config}))
ids, mask = prompts({batch}, 70, pad={pad}, seed=7)
out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
print(json.dumps(out[:, 70:].tolist()))
"""


@pytest.mark.parametrize("summaries", ["exact", "int8"])
@pytest.mark.slow
def test_consecutive_requests_equal_fresh_process_runs(summaries):
    """Two requests of different batch sizes on one model give what each gives in a new process."""
    config = dict(mode="retro", window=2, budget=24, page_size=8, dense_layers=1, max_context=128, summaries=summaries)
    model = retro_compile(tiny_model("llama", seed=6), RetroConfig(**config))
    got = []
    for batch, pad in ((1, ()), (3, (0, 9, 2))):
        ids, mask = prompts(batch, 70, pad=pad, seed=7)
        got.append(greedy(model, ids, mask, 10).tolist())
    for (batch, pad), tokens in zip(((1, ()), (3, (0, 9, 2))), got):
        script = FRESH.format(root=str(ROOT), config=config, batch=batch, pad=pad)
        fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
        assert json.loads(fresh.stdout.strip().splitlines()[-1]) == tokens


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_ten_thousand_decode_steps_with_flat_memory():
    """10,000 decode steps in one request: resident memory at step 10,000 is within a few MiB of
    step 1,000 (after the allocator has warmed up), the state's size never changes, and nothing
    recompiles."""

    class Probe(BaseStreamer):
        def __init__(self):
            self.steps, self.rss = 0, {}

        def put(self, value):
            self.steps += 1
            if self.steps in (1_000, 10_000):
                self.rss[self.steps] = _rss_mib()

        def end(self):
            pass

    model = retro_compile(tiny_model("llama", layers=2, max_positions=10_240),
                          RetroConfig(mode="retro", window=2, budget=32, page_size=16, dense_layers=1, max_context=10_100))
    ids, mask = prompts(1, 40)
    greedy(model, ids, mask, 20)
    memory = model.retro_state.memory()
    assert list(memory) == ["model.layers.1.self_attn"] and memory["model.layers.1.self_attn"] > 0
    probe = Probe()
    with torch.compiler.set_stance("fail_on_recompile"):
        out = greedy(model, ids, mask, 10_000, streamer=probe)
    assert out.shape == (1, 10_000) and probe.steps == 10_001  # the prompt, then one put per token
    assert probe.rss[10_000] - probe.rss[1_000] < 8.0, f"resident memory grew: {probe.rss}"
    assert model.retro_state.memory() == memory


def test_decode_refuses_state_its_prefill_did_not_build():
    """A prefill that runs no rewritten graph (here: forced eager) leaves no state for this request;
    the decode graph, compiled and rewritten by an earlier request, must refuse to run."""
    model = retro_compile(tiny_model("llama"), CONFIG)
    ids, mask = prompts(1, 50)
    greedy(model, ids, mask, 4)  # compiles and rewrites both graphs
    driver = model.retro_driver
    compiled_prefill = driver.run_prefill

    def eager_prefill(**kwargs):
        with torch.compiler.set_stance("force_eager"):
            return compiled_prefill(**kwargs)

    driver.run_prefill = eager_prefill
    with pytest.raises(RuntimeError, match=r"no prefill built for \['model.layers.1.self_attn'"):
        greedy(model, ids, mask, 4)
    driver.run_prefill = compiled_prefill
    assert greedy(model, ids, mask, 4).shape == (1, 4)


def test_prefill_chunks_cover_the_prompt_in_pieces_of_the_asked_size():
    from retro_compile.integrations.hf import prefill_chunks

    assert prefill_chunks(10, 1, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_chunks(11, 2, 8) == [(0, 4), (4, 8), (8, 11)]
    for batch, max_tokens in ((1, 7), (2, 16), (3, 5), (1, 1000), (4, 2)):
        size = max(1, max_tokens // batch)
        for n in range(1, 60):
            chunks = prefill_chunks(n, batch, max_tokens)
            assert chunks[0][0] == 0 and chunks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
            assert all(end - begin == size for begin, end in chunks[:-1]) and 0 < chunks[-1][1] - chunks[-1][0] <= size


def chunk_sizes(model) -> list[int]:
    """Record the rows of each prefill call the driver makes (returned list, filled as it runs)."""
    sizes: list[int] = []
    run = model.retro_driver.run_prefill
    model.retro_driver.run_prefill = lambda **kw: sizes.append(kw["input_ids"].shape[1]) or run(**kw)
    return sizes


@pytest.mark.parametrize("length,pad,window", [(70, (0, 5), 2), (66, (), 2), (66, (0, 3), 4)],
                         ids=["padded", "tail-of-2", "w4-tail-shorter-than-the-window"])
@pytest.mark.slow
def test_chunked_prefill_gives_the_tokens_of_one_piece(length, pad, window):
    """RetroConfig.prefill_tokens small enough for 5 chunks: full budget still gives the untouched
    model's tokens, and a small budget the tokens of an unchunked prefill and of the hand-driven
    reference (which never chunks), also where the last chunk has fewer rows than the window
    (the phase is said, so it is a prefill, and it keeps the output cache rows of the chunk before)."""
    model = tiny_model("llama", seed=6)
    ids, mask = prompts(2, length, pad=pad, seed=7)
    chunked = dict(prefill_tokens=2 * 16)  # 16 positions per chunk
    full = RetroConfig(mode="retro", window=window, budget=128, page_size=8, dense_layers=1, max_context=128)
    expected = greedy(model, ids, mask, 12)
    assert torch.equal(greedy(retro_compile(copy.deepcopy(model), dataclasses.replace(full, **chunked)), ids, mask, 12),
                       expected)
    small = RetroConfig(mode="retro", window=window, budget=16, page_size=8, dense_layers=1, max_context=128)
    one_piece = greedy(retro_compile(copy.deepcopy(model), small), ids, mask, 12)
    reference, _, _ = HandDriven(copy.deepcopy(model), small).generate(ids, mask, 12)
    assert torch.equal(one_piece, reference)
    compiled = retro_compile(copy.deepcopy(model), dataclasses.replace(small, **chunked))
    sizes = chunk_sizes(compiled)
    assert torch.equal(greedy(compiled, ids, mask, 12), one_piece)
    assert sizes == [16, 16, 16, 16, length - 64]


@pytest.mark.slow
def test_generate_prefill_chunk_size_gives_the_tokens_of_one_piece():
    """generate(prefill_chunk_size=...) chunks the prompt into pieces of that many positions (the
    driver's own chunking, as transformers would split it), with the tokens of a one-piece prefill;
    a later request without it prefills in one piece; a size that is no positive int is refused."""
    model = tiny_model("llama", seed=3)
    ids, mask = prompts(1, 34, seed=4)
    config = RetroConfig(mode="retro", window=4, budget=16, page_size=8, dense_layers=1, max_context=128)
    one_piece = greedy(retro_compile(copy.deepcopy(model), config), ids, mask, 8)
    compiled = retro_compile(copy.deepcopy(model), config)
    sizes = chunk_sizes(compiled)
    assert torch.equal(greedy(compiled, ids, mask, 8, prefill_chunk_size=16), one_piece)
    assert sizes == [16, 16, 2]
    assert torch.equal(greedy(compiled, ids, mask, 8), one_piece) and sizes[3:] == [34]
    with pytest.raises(ValueError, match=r"prefill_chunk_size=0\) must be an int >= 1"):
        greedy(compiled, ids, mask, 8, prefill_chunk_size=0)
