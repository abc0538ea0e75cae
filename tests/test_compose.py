"""The pass inside other pipelines: torch.export programs, AOTInductor, a backend of one's own,
and Inductor custom passes a user has set (chained with the rewrite, never replaced)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from retro_compile import RetroConfig, StateStore, rewrite_exported_program, rewrite_sdpa
from retro_compile.backend import backend_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from hand_written_decoder import Decoder  # noqa: E402

CONFIG = RetroConfig(mode="quest", budget=32, page_size=8, dense_layers=1, max_context=128)
PROMPT = 40


def decode(prefill, step, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy: ``prefill(ids, positions)`` once, then ``step`` one token at a time."""
    logits = [prefill(prompt, torch.arange(prompt.shape[1]))[:, -1]]
    tokens = []
    for t in range(prompt.shape[1], prompt.shape[1] + steps):
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        logits.append(step(tokens[-1], torch.tensor([t]))[:, -1])
    return [int(x) for x in tokens], logits


def retro_nodes(program) -> int:
    return sum("retro" in str(node.target) for node in program.graph.nodes)


@torch.no_grad()
@pytest.mark.slow
def test_exported_programs_rewritten_match_the_compiled_path():
    """Prefill and decode programs exported from one module and rewritten with one store give
    the compiled path's tokens and logits for 20 steps; the programs given stay as they were."""
    torch.manual_seed(0)
    model = Decoder(layers=3, max_len=128).eval()
    reference = Decoder(layers=3, max_len=128).eval()
    reference.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 97, (1, PROMPT))
    prefill_ep = torch.export.export(model, (prompt, torch.arange(PROMPT)))
    step_ep = torch.export.export(model, (prompt[:, :1], torch.tensor([PROMPT])))
    store = StateStore()
    prefill = rewrite_exported_program(prefill_ep, CONFIG, store=store)
    step = rewrite_exported_program(step_ep, CONFIG, store=store)
    assert retro_nodes(prefill_ep) == retro_nodes(step_ep) == 0
    assert retro_nodes(step) > 0 and store.layers() == ["layers.1.attn", "layers.2.attn"]
    got_tokens, got = decode(prefill.module(), step.module(), prompt, 20)
    compiled = torch.compile(reference, backend=backend_for(CONFIG, StateStore()), fullgraph=True)
    want_tokens, want = decode(compiled, compiled, prompt, 20)
    assert got_tokens == want_tokens
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_decode_program_without_its_prefill_stays_dense(caplog):
    torch.manual_seed(0)
    model = Decoder(layers=2, max_len=64).eval()
    step_ep = torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([10])))
    with caplog.at_level(logging.WARNING, logger="retro_compile"):
        step = rewrite_exported_program(step_ep, CONFIG)  # a fresh store: no prefill built any state
    assert retro_nodes(step) == 0
    assert "its prefill was not rewritten" in caplog.text


@torch.no_grad()
@pytest.mark.slow
def test_aot_inductor_packages_a_rewritten_program_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = Decoder(layers=2, max_len=64).eval()
    prompt = torch.randint(0, 97, (1, 20))
    program = rewrite_exported_program(torch.export.export(model, (prompt, torch.arange(20))), CONFIG)
    assert retro_nodes(program) > 0
    expected = program.module()(prompt, torch.arange(20))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "prefill.pt2"))
    torch.testing.assert_close(torch._inductor.aoti_load_package(path)(prompt, torch.arange(20)), expected)


class CountingPass(CustomGraphPass):
    """A user's own post-grad Inductor pass: counts the graphs it sees."""

    def __init__(self) -> None:
        self.graphs = 0
        self.token = os.urandom(8).hex()

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs += 1

    def uuid(self) -> str:  # a new one per instance: a cached graph would not run the pass again
        return f"counting-pass-{id(self)}-{self.token}"


@pytest.mark.parametrize("dynamic", [None, False])
@torch.no_grad()
@pytest.mark.slow
def test_user_inductor_pass_still_runs_and_the_rewrite_still_happens(dynamic):
    """backend="retro" with mode="max-autotune-no-cudagraphs" and fullgraph=True: the custom pass
    the user configured sees every graph, with retro::attention in it, and the tokens equal a
    backend of the user's own that calls rewrite_sdpa and then Inductor."""
    torch.manual_seed(0)
    model = Decoder(layers=2, max_len=64).eval()
    twin = Decoder(layers=2, max_len=64).eval()
    twin.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 97, (1, 30))
    counting = CountingPass()
    config = RetroConfig(mode="quest", budget=16, page_size=8, dense_layers=0, max_context=64)
    # torch.compile takes mode= or options=, not both: with a mode, the config is bound to the backend.
    retro_store = StateStore()
    compiled = torch.compile(model, backend=backend_for(config, retro_store),
                             mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=dynamic)
    with torch._inductor.config.patch(post_grad_custom_post_pass=counting):
        got, _ = decode(compiled, compiled, prompt, 6)
    assert counting.graphs >= 2  # the prefill and the decode graph, after the rewrite
    assert retro_store.layers() == ["layers.0.attn", "layers.1.attn"]

    seen = []
    store = StateStore()

    def own_backend(gm, example_inputs):
        seen.append(len(gm.graph.nodes))  # the user's own step first
        rewrite_sdpa(gm, config, store)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    want, _ = decode(*(2 * [torch.compile(twin, backend=own_backend, dynamic=dynamic)]), prompt, 6)
    assert got == want and seen and store.layers() == ["layers.0.attn", "layers.1.attn"]


def test_the_config_guard_catches_a_deleted_or_leaked_inductor_option():
    """The suite's guard (conftest) fails a test that deletes an Inductor option (what pytest 9.2's
    monkeypatch did to ``post_grad_custom_post_pass``) or leaves one changed; ``config.patch`` leaves
    nothing behind."""
    from tests.conftest import changed_options

    config = torch._inductor.config
    before = config.get_config_copy()
    deleted = dict(before)
    del deleted["post_grad_custom_post_pass"]
    assert changed_options(before, deleted) == ["post_grad_custom_post_pass"]
    with config.patch(post_grad_custom_post_pass=CountingPass()):
        assert changed_options(before, config.get_config_copy()) == ["post_grad_custom_post_pass"]
    assert changed_options(before, config.get_config_copy()) == []
    assert config.post_grad_custom_post_pass is None
