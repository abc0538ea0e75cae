"""The quality harnesses (perplexity, exposure, passkey) on a tiny random model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import retro_compile.kernels.reference as reference
from retro_compile import RetroConfig, retro_compile
from retro_compile.eval.decode import ExposureMeter, perplexity, teacher_forced_nll
from retro_compile.eval.passkey import is_correct, passkey_answers, passkey_prompt, random_keys

from .hf_models import VOCAB, prompts, tiny_model
from .benchmark_scripts import load_script


def sparse(mode: str, budget: int, window: int | None = None, max_context: int = 128) -> RetroConfig:
    return RetroConfig(mode=mode, budget=budget, window=window, page_size=8, dense_layers=1, max_context=max_context)


def test_dense_nll_equals_one_forward_loss_per_sequence():
    model = tiny_model("llama", seed=9)
    ids, _ = prompts(2, 80, seed=10)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, 39:-1]
    direct = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 40:], reduction="none")
    dense = retro_compile(copy.deepcopy(model), RetroConfig(mode="dense", max_context=128))
    nll = teacher_forced_nll(dense, ids, prefill=40)
    assert nll.shape == (2, 40)
    torch.testing.assert_close(nll, direct, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_full_budget_ppl_is_the_same_in_every_mode():
    model = tiny_model("llama", seed=9)
    ids, _ = prompts(2, 80, seed=10)
    dense = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), RetroConfig(mode="dense", max_context=128)),
                                          ids, prefill=40))
    for mode, window in [("quest", 1), ("retro", 2), ("retro", 4)]:
        ppl = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), sparse(mode, 128, window)), ids, 40))
        assert ppl == pytest.approx(dense, rel=1e-4), (mode, window)


@pytest.mark.slow
def test_small_budget_changes_ppl():
    model = tiny_model("llama", seed=9)
    ids, _ = prompts(1, 100, seed=10)
    dense = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), RetroConfig(mode="dense", max_context=128)),
                                          ids, prefill=40))
    quest = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), sparse("quest", 16)), ids, prefill=40))
    assert quest != pytest.approx(dense, rel=1e-4)


@pytest.mark.parametrize("mode,window", [("quest", 1), ("retro", 2), ("retro", 4)])
@pytest.mark.slow
def test_exposure_equals_the_union_of_the_selected_page_sets(monkeypatch, mode, window):
    """Oracle: the page sets the selection itself returns, recorded call by call, unioned by hand."""
    calls = []

    def recording_top_pages(*args, **kwargs):
        indices, chosen = original(*args, **kwargs)
        calls.append([[set(indices[b, h][chosen[b, h]].tolist()) for h in range(indices.shape[1])]
                      for b in range(indices.shape[0])])
        return indices, chosen

    original = reference.top_pages
    monkeypatch.setattr(reference, "top_pages", recording_top_pages)
    model = retro_compile(tiny_model("llama", seed=3), sparse(mode, 24, window), inductor=False)
    ids, _ = prompts(2, 90, seed=4)
    meter = ExposureMeter(model, window)
    teacher_forced_nll(model, ids, prefill=40, meter=meter)

    layers = len(model.retro_state.layers())
    assert layers == 3 and len(calls) == layers * 49  # one selection per sparse layer and step
    steps = [calls[i:i + layers] for i in range(0, len(calls), layers)]
    ratios = []
    for t in range(len(steps) - window + 1):
        for layer in range(layers):
            for b, heads in enumerate(steps[t][layer]):
                for h, first in enumerate(heads):
                    union = set().union(*(steps[t + i][layer][b][h] for i in range(window)))
                    ratios.append(len(union) / len(first))
    assert meter.value == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)
    if mode == "quest":
        assert meter.value == 1.0
    else:
        assert 1.0 < meter.value <= window


def test_exposure_needs_enough_steps():
    model = retro_compile(tiny_model("llama", seed=3), sparse("retro", 24, 4), inductor=False)
    ids, _ = prompts(1, 43, seed=4)
    meter = ExposureMeter(model, 4)
    teacher_forced_nll(model, ids, prefill=40, meter=meter)  # two decode steps
    with pytest.raises(ValueError, match="window=4"):
        meter.value


@pytest.mark.slow
def test_exposure_refuses_a_model_that_decoded_at_two_batch_sizes():
    model = retro_compile(tiny_model("llama", seed=3), sparse("retro", 24, 2), inductor=False)
    teacher_forced_nll(model, prompts(1, 43, seed=4)[0], prefill=40)
    meter = ExposureMeter(model, 2)
    with pytest.raises(ValueError, match="several batch sizes"):
        teacher_forced_nll(model, prompts(2, 43, seed=4)[0], prefill=40, meter=meter)


class CharTokenizer:
    """Byte-level stand-in for a real tokenizer: one token per character, modulo the tiny vocab."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def batch_decode(self, ids):
        return ["".join(chr(int(i)) for i in row) for row in ids]


def test_passkey_prompt_has_the_asked_length_and_the_needle_at_its_depth():
    tok = CharTokenizer()
    for depth in (0.0, 0.25, 0.9, 1.0):
        prompt = passkey_prompt(tok, 2000, depth, "12345")
        text = tok.batch_decode([prompt.context])[0]
        assert len(prompt.context) + len(prompt.question) == 2000
        assert text.count("12345") == 2
        assert abs(text.index("The pass key is") / len(text) - depth) < 0.08
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 2000, 1.5, "12345")
    with pytest.raises(ValueError, match="length=50"):
        passkey_prompt(tok, 50, 0.5, "12345")
    keys = random_keys(20, seed=1)
    assert keys == random_keys(20, seed=1) and all(len(k) == 5 and k.isdigit() for k in keys)


def test_is_correct_is_an_exact_match_of_the_first_number():
    assert is_correct(" 12345.\n", "12345")
    assert not is_correct(" 1234.", "12345") and not is_correct(" 123456", "12345")
    assert not is_correct(" the key", "12345") and not is_correct(" 99 is 12345", "12345")


@pytest.mark.slow
def test_passkey_answers_equal_generate_on_the_untouched_model():
    """Dense: the hand-driven question-then-answer decode gives what HF's own generate() gives."""
    tok = CharTokenizer()
    model = tiny_model("llama", seed=5)
    prompts_ = [passkey_prompt(tok, 300, depth, key) for depth, key in zip((0.2, 0.7), random_keys(2, 0))]
    whole = torch.tensor([p.context + p.question for p in prompts_])
    with torch.no_grad():
        expected = model.generate(whole, max_new_tokens=8, do_sample=False)[:, whole.shape[1]:]
    for config in (RetroConfig(mode="dense", max_context=320), sparse("retro", 512, 2, max_context=320)):
        answers = passkey_answers(retro_compile(copy.deepcopy(model), config), tok, prompts_)
        assert answers == tok.batch_decode(expected), config.mode


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from retro_compile.eval.plot import plot

    rows = [dict(mode="dense", budget=None, window=1, ppl=10.0),
            dict(mode="quest", budget=64, window=1, ppl=14.0, exposure=1.0),
            dict(mode="retro", budget=64, window=2, ppl=12.0, exposure=1.4)]
    path = tmp_path / "ppl.json"
    path.write_text(json.dumps(dict(task="ppl", setup=dict(model="tiny", passages=1, context=80, prefill=40),
                                    results=rows)))
    png = plot(path)
    assert png == tmp_path / "ppl.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_crosses_sink_settings_with_every_sparse_configuration():
    from retro_compile.eval.cli import configurations, parse_args

    args = parse_args(["ppl", "--budgets", "64", "128", "--window", "2", "4", "--sink-pages", "0", "1"])
    runs = configurations(args)
    assert runs[0] == ("dense", None, 1, 0) and len(runs) == len(set(runs))
    expected = {(mode, budget, window, sink) for budget in (64, 128) for sink in (0, 1)
                for mode, window in (("quest", 1), ("retro", 2), ("retro", 4))}
    assert set(runs[1:]) == expected
    with pytest.raises(SystemExit):
        parse_args(["ppl", "--sink-pages", "-1"])


def test_parallel_configurations_share_the_cpu_threads():
    """Each of --jobs N worker processes gets its share of this process's threads, not all of them."""
    from retro_compile.eval import cli

    with cli.worker_pool(2) as pool:
        assert pool.submit(torch.get_num_threads).result() == max(1, torch.get_num_threads() // 2)


def test_summary_precision_rounds_outward_to_e4m3():
    """``benchmarks/summary_precision.py`` stores a summary's max row rounded up and its min row
    rounded down to float8 e4m3 values, so a page's score stays an upper bound. Against torch's
    own e4m3 conversion (round to nearest): the result is that value or its neighbour on the
    outward side, and brackets the input; beyond e4m3's range it is +-inf."""
    module = load_script("summary_precision")
    rounding = module.OutwardRounding()
    grid = rounding.grid
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=g) * 10.0 ** torch.randint(-4, 3, (2000,), generator=g),
                   grid, torch.tensor([0.0, -0.0, 448.0, -448.0, 449.0, -1000.0])])
    nearest = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    at = torch.searchsorted(grid, nearest)
    up, down = rounding._round(x, up=True), rounding._round(x, up=False)
    inside = x.abs() <= 448
    assert torch.equal(up[inside], torch.where(nearest >= x, nearest, grid[(at + 1).clamp(max=len(grid) - 1)])[inside])
    assert torch.equal(down[inside], torch.where(nearest <= x, nearest, grid[(at - 1).clamp(min=0)])[inside])
    assert (up >= x).all() and (down <= x).all()
    assert torch.equal(up[~inside], torch.tensor([float("inf"), -448.0]))
    assert torch.equal(down[~inside], torch.tensor([448.0, float("-inf")]))
    assert rounding.clamped == 4  # 449 and -1000, in each direction
    # inside the context, the reference's summaries come out rounded outward; after it, as they were
    k = torch.randn(1, 2, 32, 8, generator=g)
    valid = torch.ones(1, 32, dtype=torch.bool)
    kmax, kmin = reference.build_summaries(k, valid, 8)
    with module.OutwardRounding() as outward:
        rounded_max, rounded_min = reference.build_summaries(k, valid, 8)
    assert torch.equal(rounded_max, outward._round(kmax, up=True)) and (rounded_max >= kmax).all()
    assert torch.equal(rounded_min, outward._round(kmin, up=False)) and (rounded_min <= kmin).all()
    assert not torch.equal(rounded_max, kmax) and not torch.equal(rounded_min, kmin)
    assert all(torch.equal(a, b) for a, b in zip(reference.build_summaries(k, valid, 8), (kmax, kmin)))


def test_eval_runs_bfloat16_on_cuda_and_float32_on_the_cpu_unless_told():
    from retro_compile.eval.cli import parse_args

    assert parse_args(["ruler", "--device", "cpu"]).dtype == "float32"
    assert parse_args(["ruler", "--device", "cuda"]).dtype == "bfloat16"
    assert parse_args(["ppl", "--device", "cuda", "--dtype", "float32"]).dtype == "float32"


@pytest.mark.slow
def test_the_gap_probe_is_an_independent_quest_and_retro():
    """``benchmarks/gap_decomposition.py``'s probe, written apart from the package, teacher forced
    on the same text: its quest gives the package's quest NLL, its retro merging past rows' cached
    outputs gives the package's retro NLL (w=2 and w=4), and recomputing them with the rows'
    current queries (no merge drift) gives something else."""
    script = load_script("gap_decomposition")
    script.PROBE.page_size, script.PROBE.dense_layers = 8, 1
    model = tiny_model("llama", seed=2)
    ids, _ = prompts(1, 96, seed=3)
    probe = copy.deepcopy(model)
    probe.set_attn_implementation("gap_probe")
    dense, captured = script.dense_pass(probe, ids, 64)

    def past() -> dict:
        return {layer: (k.clone(), v.clone()) for layer, (k, v) in captured.items()}

    def package(mode: str, window: int) -> torch.Tensor:
        return teacher_forced_nll(retro_compile(copy.deepcopy(model), sparse(mode, 16, window), inductor=False), ids, 64)

    quest = script.probe_nll(probe, ids, 64, dense[:, 0], past(), 2, keep_own=True)
    torch.testing.assert_close(quest, package("quest", 1), atol=1e-4, rtol=1e-4)
    for window in (2, 4):
        merged = script.retro_probe_nll(probe, ids, 64, dense[:, 0], past(), 2, window, merge=True)
        torch.testing.assert_close(merged, package("retro", window), atol=1e-4, rtol=1e-4)
        recomputed = script.retro_probe_nll(probe, ids, 64, dense[:, 0], past(), 2, window, merge=False)
        assert (recomputed - merged).abs().max() > 1e-4


def test_the_gap_probes_page_scores_against_a_page_by_page_computation():
    """The probe's three page rankings, each checked against its definition computed one page at a
    time (the last page partial: 40 keys in pages of 16), and the oracle picking the page that
    holds one dominant key."""
    script = load_script("gap_decomposition")
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 40, 8)  # 2 query heads per KV head
    qg = q.view(2, 2, 2, 8)
    for selection in ("bound", "meanstd", "oracle"):
        got = script.page_scores(q, k, 16, selection)
        assert got.shape == (2, 2, 2, 3)
        for page, start in enumerate((0, 16, 32)):
            keys = k[:, :, start:start + 16]  # (B, Hkv, <=16, D)
            if selection == "bound":
                want = torch.maximum(qg * keys.amax(2)[:, :, None], qg * keys.amin(2)[:, :, None]).sum(-1)
            elif selection == "meanstd":
                mean, var = keys.mean(2), keys.var(2, unbiased=False)
                want = (qg * mean[:, :, None]).sum(-1) + script.SPREAD * (qg ** 2 * var[:, :, None]).sum(-1).sqrt()
            else:
                want = (torch.einsum("bhgd,bhtd->bhgt", qg, keys) / 8 ** 0.5).logsumexp(-1)
            torch.testing.assert_close(got[..., page], want, msg=f"{selection}, page {page}")
    k[:, :, 20] = 50 * q.view(2, 2, 2, 8)[:, :, 0]  # page 1 holds the key the first query head of a group matches
    assert (script.page_scores(q, k, 16, "oracle").amax(2).argmax(-1) == 1).all()
