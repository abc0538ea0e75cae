"""torch.compile(model, backend="retro") on a decoder written by hand (no transformers)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro_compile import RetroConfig
from retro_compile.passes.sdpa import find_sdpa_sites
from retro_compile.state import StateStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from hand_written_decoder import Decoder, greedy  # noqa: E402


def captured_graphs(model: torch.nn.Module, *calls: tuple) -> list[tuple[torch.fx.GraphModule, list]]:
    """The (graph, example inputs) Dynamo hands a backend for each new graph of ``calls`` (static shapes)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    compiled = torch.compile(model, backend=capture, dynamic=False)
    with torch.no_grad():
        for args in calls:
            compiled(*args)
    return graphs


@pytest.mark.slow
def test_backend_rewrites_sdpa_fullgraph_without_recompiles():
    torch.manual_seed(0)
    model = Decoder(layers=3, max_len=128).eval()
    config = RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=1, max_context=128)
    store = StateStore()
    from retro_compile.backend import backend_for

    compiled = torch.compile(model, backend=backend_for(config, store), fullgraph=True)
    prompt = torch.randint(0, 97, (1, 70))
    with torch.no_grad():
        compiled(prompt, torch.arange(70))  # prefill graph
        for t in (70, 71):  # first decode graph
            compiled(torch.randint(0, 97, (1, 2)), torch.arange(t - 1, t + 1))
        with torch.compiler.set_stance("fail_on_recompile"):
            for t in range(72, 80):
                compiled(torch.randint(0, 97, (1, 2)), torch.arange(t - 1, t + 1))
    assert store.layers() == ["layers.1.attn", "layers.2.attn"]


@pytest.mark.slow
def test_string_backend_full_budget_equals_dense(caplog, monkeypatch):
    torch.manual_seed(0)
    model = Decoder(layers=3, max_len=128).eval()
    prompt = torch.randint(0, 97, (1, 60))
    dense = greedy(model, prompt, 10)
    config = RetroConfig(mode="retro", budget=128, page_size=16, dense_layers=1, max_context=128)
    from retro_compile import backend

    monkeypatch.setattr(backend, "DEFAULT_STORE", StateStore())  # a fresh one logs every reason again
    with caplog.at_level(logging.INFO, logger="retro_compile"):
        retro = greedy(torch.compile(model, backend="retro", options={"retro_config": config}), prompt, 10, window=2)
    assert torch.equal(dense, retro)
    assert "layers.0.attn stays dense SDPA: layer 0 is in dense_layers" in caplog.text


def test_unsupported_sites_stay_sdpa_with_reason():
    class Dropout(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    gm = torch.fx.symbolic_trace(Dropout())
    sites = find_sdpa_sites(gm.graph)
    assert len(sites) == 1 and sites[0].dropout_p == 0.1
    from retro_compile.passes.rewrite import unsupported_reason

    assert "dropout" in unsupported_reason(sites[0])


def test_export_graph_sites_are_found():
    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.5)

    q = torch.randn(1, 2, 3, 8)
    ep = torch.export.export(M(), (q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool)))
    sites = find_sdpa_sites(ep.graph)
    assert len(sites) == 1
    assert sites[0].scale == 0.5 and sites[0].attn_mask is not None and sites[0].is_causal is False


def test_decode_site_without_a_rewritten_prefill_stays_dense_with_a_warning(caplog):
    """A decode graph whose layer state no prefill graph builds keeps SDPA there (and says so at
    WARNING): rewritten, it would read zeros or another request's state."""
    from retro_compile.passes.rewrite import rewrite_sdpa

    (step, _), = captured_graphs(Decoder(layers=2, max_len=64).eval(),
                                 (torch.randint(0, 97, (1, 2)), torch.arange(30, 32)))  # 2 rows: decode
    config = RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=1, max_context=64)
    store = StateStore()
    with caplog.at_level(logging.INFO, logger="retro_compile"):
        plan = rewrite_sdpa(step, config, store)
    assert plan.reads == {} and plan.builds == {} and store.layers() == []
    assert "its prefill was not rewritten" in store.dense_reasons["layers.1.attn"]
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "layers.1.attn" in warned[0].getMessage()
    assert all("layers.0.attn" not in r.getMessage() for r in warned)  # a chosen dense layer logs at INFO


def test_dense_decode_sites_with_several_rows_attend_row_by_row():
    """A dense layer's window rows go through SDPA one row at a time: the same result as one call."""
    from retro_compile.kernels.reference import sdpa_row_by_row

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 3, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    mask = torch.rand(2, 1, 3, 40, generator=g) > 0.3
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
    torch.testing.assert_close(sdpa_row_by_row(q, k, v, mask, scale=0.3, enable_gqa=True), expected)
    for other in (mask[:, :, :1], mask[0, 0], None):  # a mask shared by the rows, a 2D mask, none
        torch.testing.assert_close(sdpa_row_by_row(q, k, v, other, enable_gqa=True),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=other,
                                                                                    enable_gqa=True))


def test_dense_decode_window_sites_become_one_dense_window_call():
    """A decode site left dense with two rows becomes ``retro::dense_window`` (one pass over the
    cache on CUDA): the graph gives the SDPA it replaced, and the op equals SDPA for every mask
    form SDPA takes (per row, shared by the rows, 2-D, none)."""
    from retro_compile.passes.rewrite import rewrite_sdpa

    torch.manual_seed(0)
    (gm, inputs), = captured_graphs(Decoder(layers=2, max_len=64).eval(),
                                    (torch.randint(0, 97, (1, 2)), torch.arange(30, 32)))
    with torch.no_grad():
        expected = gm(*inputs)
    config = RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=2, max_context=64)
    rewrite_sdpa(gm, config, StateStore())
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.retro.dense_window.default]
    assert len(calls) == 2 and not find_sdpa_sites(gm.graph)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), expected)

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 8, 3, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    mask = torch.rand(2, 1, 3, 40, generator=g) > 0.3
    for m in (mask, mask[:, :, :1], mask[0, 0], None):
        torch.testing.assert_close(torch.ops.retro.dense_window(q, k, v, m, 0.3, True),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3,
                                                                                    enable_gqa=True))


def test_dense_window_takes_its_kernel_only_where_it_applies():
    """The CUDA decision of ``retro::dense_window``, on fake CUDA tensors: a shared boolean (or no)
    mask, whole query groups of at most 128 rows a KV head, power-of-two head dims; anything else
    goes to SDPA row by row."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from retro_compile.kernels.op import dense_window_kernel_applies as applies

    with FakeTensorMode():
        def t(*shape, dtype=torch.bfloat16, device="cuda"):
            return torch.empty(*shape, dtype=dtype, device=device)

        q, k = t(2, 32, 2, 128), t(2, 8, 1024, 128)
        assert applies(q, k, k, t(2, 1, 2, 1024, dtype=torch.bool), True)
        assert applies(q, k, k, None, True) and applies(q, k, k, t(2, 1024, dtype=torch.bool), True)
        assert not applies(q, k, k, t(2, 32, 2, 1024, dtype=torch.bool), True)  # a mask per head
        assert not applies(q, k, k, t(2, 1, 2, 1024), True)  # an additive mask
        assert not applies(q, k, k, None, False)  # 32 query heads over 8 without enable_gqa: SDPA's error
        assert not applies(t(2, 32, 40, 128), k, k, None, True)  # 4 x 40 rows a KV head
        assert not applies(t(2, 32, 2, 96), t(2, 8, 1024, 96), t(2, 8, 1024, 96), None, True)
        assert not applies(t(2, 32, 2, 128, device="cpu"), t(2, 8, 1024, 128, device="cpu"),
                           t(2, 8, 1024, 128, device="cpu"), None, True)


def test_decode_sites_sharing_a_mask_share_one_positions_node():
    """The decode graph finds its query positions once: one ``mask_positions`` node from the shared
    mask feeds every layer's ``retro::attention`` (without it, each layer reduces the mask itself),
    and the rewritten step gives what the graph gave before at full budget (dense attention)."""
    from retro_compile.kernels.masks import mask_positions
    from retro_compile.passes.rewrite import rewrite_sdpa

    torch.manual_seed(0)
    prompt = torch.randint(0, 97, (1, 30))
    window = torch.cat([prompt[:, -1:], torch.randint(0, 97, (1, 1))], 1)  # the prompt's last token and a new one
    (prefill, prefill_inputs), (step, step_inputs) = captured_graphs(
        Decoder(layers=4, max_len=64).eval(), (prompt, torch.arange(30)), (window, torch.arange(29, 31)))
    with torch.no_grad():
        expected = step(*step_inputs)
    config = RetroConfig(mode="retro", budget=64, page_size=16, dense_layers=1, max_context=64)
    store = StateStore()
    rewrite_sdpa(prefill, config, store)
    plan = rewrite_sdpa(step, config, store)
    assert sorted(plan.reads) == ["layers.1.attn", "layers.2.attn", "layers.3.attn"]
    shared = [n for n in step.graph.nodes if n.target is mask_positions]
    calls = [n for n in step.graph.nodes if n.target is torch.ops.retro.attention.default]
    assert len(shared) == 1 and len(calls) == 3
    assert all(call.args[-2] is shared[0] and call.args[-1] is None for call in calls)  # positions; no phase said
    with torch.no_grad():
        prefill(*prefill_inputs)  # builds the state the step reads
        torch.testing.assert_close(step(*step_inputs), expected)


DECODE_IN_A_PROCESS = """
import json
import torch
from torch._dynamo.utils import counters
from retro_compile import RetroConfig, retro_compile
from hf_models import greedy_new_tokens, prompts, tiny_model

model = retro_compile(tiny_model("llama", seed=5), RetroConfig(mode="retro", window=2, budget=16, page_size=8,
                                                               dense_layers=1, max_context=128), inductor=True)
ids, mask = prompts(2, 40, pad=(0, 5), seed=6)
tokens = greedy_new_tokens(model, ids, mask, 6)
print(json.dumps(dict(tokens=tokens.tolist(), aot=dict(counters["aot_autograd"]))))
"""


def decode_in_a_process(package: Path, caches: Path) -> dict:
    """Greedy tokens of a small-budget request through the package at ``package`` (a folder holding
    ``retro_compile``) with Inductor, in a new process over the compile caches in ``caches``, and
    that process's AOTAutograd cache counters."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton"),
           "PYTHONPATH": os.pathsep.join([str(package), str(tests), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", DECODE_IN_A_PROCESS], env=env, cwd=package, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_is_served_the_compiled_step_but_a_changed_package_is_not(tmp_path):
    """The decode step's compile caches stay on: a second process of the same package source is
    served the first's compiled graphs (AOTAutograd's cache hits; the decode state goes in as graph
    inputs, not as buffers hashed by value) and decodes the same tokens; a package whose op body
    changed (as after an upgrade) is not served them and runs its own body."""
    import shutil

    source = Path(__file__).resolve().parents[1] / "retro_compile"
    same, changed = tmp_path / "same", tmp_path / "changed"
    for folder in (same, changed):
        shutil.copytree(source, folder / "retro_compile", ignore=shutil.ignore_patterns("__pycache__"))
    reference = changed / "retro_compile" / "kernels" / "reference.py"
    body = reference.read_text()
    last_line = "        default_scale(q, scale), page_size)\n"
    assert body.count(last_line) == 1  # decode_step's return: its output halved in the changed version
    reference.write_text(body.replace(last_line, last_line.rstrip("\n") + " * 0.5\n"))

    first = decode_in_a_process(same, tmp_path / "caches")
    second = decode_in_a_process(same, tmp_path / "caches")
    upgraded = decode_in_a_process(changed, tmp_path / "caches")
    fresh = decode_in_a_process(changed, tmp_path / "fresh_caches")
    assert first["aot"].get("autograd_cache_saved", 0) >= 1 and not first["aot"].get("autograd_cache_hit")
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and not second["aot"].get("autograd_cache_bypass")
    assert second["tokens"] == first["tokens"]
    assert not upgraded["aot"].get("autograd_cache_hit") and upgraded["tokens"] == fresh["tokens"]
    assert upgraded["tokens"] != first["tokens"]  # the change shows in the tokens, so serving stale would


def test_the_backend_compiles_under_a_cache_key_of_the_package_source(monkeypatch):
    """The backend hands Inductor its rewritten graph, with the decode state as inputs after
    Dynamo's, under a compile cache key tag that holds the package source's digest."""
    import torch.compiler.config
    import torch._inductor.compile_fx

    from retro_compile.backend import retro_backend
    from retro_compile.kernels.op import source_digest

    seen = []

    def compile_fx(gm, inputs, **kwargs):
        seen.append((torch.compiler.config.cache_key_tag, len(gm.graph.find_nodes(op="placeholder")), len(inputs)))
        return lambda *args: None

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", compile_fx)
    model = Decoder(layers=2, max_len=64).eval()
    (gm, inputs), = captured_graphs(model, (torch.randint(0, 97, (1, 40)), torch.arange(40)))
    dynamo_inputs = len(gm.graph.find_nodes(op="placeholder"))
    retro_backend(gm, inputs, config=RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=0, max_context=64),
                  store=StateStore())
    (tag, placeholders, given), = seen
    assert tag == f"retro-compile:{source_digest()}" and len(source_digest()) == 64
    assert placeholders == given == dynamo_inputs + 2 * 7  # two layers' seven state fields


def test_a_said_phase_decides_what_a_site_is_whatever_its_rows():
    """The same 2-row graph (rows <= window): by its rows a decode site (with no prefill before it,
    left dense); said to be a prefill, its sparse layer builds state, and the op call carries the
    phase; said to be a decode step after that prefill, it reads that state; a decode phase with
    more rows than the window, or an unknown phase, is refused naming it."""
    import pytest

    from retro_compile.passes.rewrite import rewrite_sdpa

    model = Decoder(layers=2, max_len=64).eval()
    two_rows = (torch.randint(0, 97, (1, 2)), torch.arange(30, 32))
    config = RetroConfig(mode="retro", window=2, budget=32, page_size=16, dense_layers=1, max_context=64)
    store = StateStore()
    (graph, _), = captured_graphs(model, two_rows)
    assert rewrite_sdpa(graph, config, store).layers == []
    (graph, _), = captured_graphs(model, two_rows)
    prefill = rewrite_sdpa(graph, config, store, phase="prefill")
    assert prefill.layers == ["layers.1.attn"] and prefill.reads == {}  # layer 0 is dense: builds nothing
    ops = [n for n in graph.graph.nodes if n.target is torch.ops.retro.attention.default]
    assert [n.args[-1] for n in ops] == [True]  # prefill=True
    (graph, _), = captured_graphs(model, two_rows)
    decode = rewrite_sdpa(graph, config, store, phase="decode")
    assert decode.builds == {} and decode.reads["layers.1.attn"] is prefill.builds["layers.1.attn"]
    ops = [n for n in graph.graph.nodes if n.target is torch.ops.retro.attention.default]
    assert [n.args[-1] for n in ops] == [False]
    (graph, _), = captured_graphs(model, (torch.randint(0, 97, (1, 5)), torch.arange(0, 5)))
    with pytest.raises(ValueError, match="has 5 query rows in a graph compiled as a decode step"):
        rewrite_sdpa(graph, config, store, phase="decode")
    with pytest.raises(ValueError, match="phase='chunk' is not one of"):
        rewrite_sdpa(graph, config, store, phase="chunk")
