"""FOCUS/OMP-style rows from overlapping tokens, and mean + noise output rows (tiny tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ct.errors import ConfigError
from megatron_ct.expansion.vocab.overlap import (
    AuxSpace,
    AuxSpaceConfig,
    build_aux_space,
    focus_weights,
    omp,
    overlap_combinations,
    sparsemax,
)
from megatron_ct.expansion.vocab.resize import VocabResizePlan, resize_embeddings, resize_vocab_matrix

V_OLD, H, D = 40, 12, 16  # old tokens, model width, aux-space width


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def old_matrix() -> torch.Tensor:
    return torch.randn(V_OLD, H, generator=torch.Generator().manual_seed(5)) * 0.2 + 0.05  # [V_old, h]


def toy_space(rng: np.random.Generator) -> AuxSpace:
    """Old ids 0..39 with random unit vectors (id 7 has none); appended id 40 = 0.7 v3 - 1.3 v11
    exactly; id 41 = v5 + small noise; id 42 has no vector."""
    old_ids = np.array([i for i in range(V_OLD) if i != 7])
    old_vecs = unit(rng.standard_normal((len(old_ids), D)))
    vec = dict(zip(old_ids.tolist(), old_vecs, strict=True))
    new40 = 0.7 * vec[3] - 1.3 * vec[11]
    new41 = vec[5] + 0.05 * rng.standard_normal(D)
    return AuxSpace(ids=np.concatenate([old_ids, [40, 41]]), vectors=np.vstack([old_vecs, new40, new41]))


def test_omp_recovers_an_exact_two_token_combination():
    space = toy_space(np.random.default_rng(0))
    combos = overlap_combinations("omp", space, V_OLD, 3, k=4)
    got = dict(combos[0])
    assert set(got) == {3, 11}  # stops once the residual is zero
    assert got[3] == pytest.approx(0.7, abs=1e-9) and got[11] == pytest.approx(-1.3, abs=1e-9)
    assert combos[2] == ()  # no vector: resize falls back to subword_mean

    # The same coefficients land on the model's rows.
    old = old_matrix()
    p = VocabResizePlan(old_vocab_size=V_OLD, sources=((1, 2), (4,), (8, 9)), init="omp", combinations=combos,
                        divisible_by=1)  # fmt: skip
    new = resize_vocab_matrix(old, p)
    expected = 0.7 * old[3].double() - 1.3 * old[11].double()
    torch.testing.assert_close(new[V_OLD].double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(new[V_OLD + 2], old[[8, 9]].mean(0), rtol=0, atol=1e-6)
    assert torch.equal(new[:V_OLD], old)


def test_omp_keeps_at_most_k_atoms():
    rng = np.random.default_rng(1)
    dictionary = rng.standard_normal((30, D))
    picked, coef = omp(rng.standard_normal(D), dictionary, k=5)
    assert len(picked) == len(set(picked.tolist())) == len(coef) == 5


def test_focus_weights_are_a_distribution_over_overlapping_tokens():
    space = toy_space(np.random.default_rng(2))
    # A fourth appended token (id 43) identical to id 41: more similar to 41 than any old
    # token, yet only old tokens may be sources.
    space = AuxSpace(ids=np.append(space.ids, 43), vectors=np.vstack([space.vectors, space.vectors[-1]]))
    combos = overlap_combinations("focus", space, V_OLD, 4, k=6)
    for pairs in (combos[1], combos[3]):
        ids, weights = zip(*pairs, strict=True)
        assert all(0 <= i < V_OLD and i != 7 for i in ids) and len(ids) <= 6
        assert all(w > 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-12)
        assert max(pairs, key=lambda p: p[1])[0] == 5  # its nearest overlapping token leads
    assert combos[2] == ()

    old = old_matrix()
    p = VocabResizePlan(old_vocab_size=V_OLD, sources=((1,),) * 4, init="focus", combinations=combos, divisible_by=1)
    row = resize_vocab_matrix(old, p)[V_OLD + 1].double()
    expected = sum(w * old[i].double() for i, w in combos[1])
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-6)


def test_sparsemax_projects_onto_the_simplex():
    p = sparsemax(np.array([0.9, 0.85, 0.1, -0.3]))
    assert p.sum() == pytest.approx(1.0) and (p >= 0).all() and p[2] == p[3] == 0.0
    assert sparsemax(np.array([3.0, 0.0]))[0] == 1.0
    picked, weights = focus_weights(np.ones(3), np.eye(3), k=3)  # equally similar: equal weights
    np.testing.assert_allclose(weights, [1 / 3] * 3)


def test_aux_space_puts_interchangeable_tokens_together():
    """New token 50 occurs where old token 5 does (same neighbours); old token 6 elsewhere."""
    rng = np.random.default_rng(3)
    docs = []
    for _ in range(300):
        left, right = rng.integers(10, 20), rng.integers(20, 30)
        docs.append([int(left), int(rng.choice([5, 50])), int(right)])
        docs.append([int(rng.integers(30, 40)), 6, int(rng.integers(30, 40))])
    space = build_aux_space(docs, AuxSpaceConfig(dim=8, window=1, min_count=2))
    assert {5, 6, 50} <= set(space.ids.tolist())
    np.testing.assert_allclose(np.linalg.norm(space.vectors, axis=1), 1.0)
    combos = overlap_combinations("focus", space, 50, 1, k=3)
    assert max(combos[0], key=lambda p: p[1])[0] == 5
    again = build_aux_space(docs, AuxSpaceConfig(dim=8, window=1, min_count=2))
    assert np.array_equal(space.vectors, again.vectors)  # seeded SVD: the same space every run


def test_mean_noise_output_rows_do_not_steal_probability():
    emb = old_matrix()
    out = old_matrix().flip(0) * 1.5
    sources = tuple((i, i + 1) for i in range(10))
    p = VocabResizePlan(old_vocab_size=V_OLD, sources=sources, output_init="mean_noise", divisible_by=1)
    new_emb, new_out = resize_embeddings(emb, out, p)
    torch.testing.assert_close(new_emb[V_OLD + 2], emb[[2, 3]].mean(0))  # input rows: subword_mean
    assert torch.equal(new_out[:V_OLD], out)
    hidden = torch.randn(64, H, generator=torch.Generator().manual_seed(1))  # [n, h]
    logits = hidden @ new_out.T  # [n, V_new]
    avg_old = logits[:, :V_OLD].mean(1, keepdim=True)
    off_average = (logits[:, V_OLD:] - avg_old).abs().max()
    assert off_average < 0.1  # the old tokens' average logit (+ noise), so mean probability at most
    # A subword-mean output row gives a new token its pieces' logits instead.
    _, sub_out = resize_embeddings(emb, out, VocabResizePlan(old_vocab_size=V_OLD, sources=sources, divisible_by=1))
    assert ((hidden @ sub_out.T)[:, V_OLD:] - avg_old).abs().max() > 10 * off_average
    assert not torch.equal(new_out[V_OLD], new_out[V_OLD + 1])  # the noise breaks the symmetry


def test_untie_gives_tied_embeddings_their_own_output_rows():
    emb = old_matrix()
    p = VocabResizePlan(old_vocab_size=V_OLD, sources=((1, 2),) * 3, output_init="mean_noise", untie=True,
                        divisible_by=8)  # fmt: skip
    new_emb, new_out = resize_embeddings(emb, None, p)
    assert new_emb is not new_out and new_out.shape == new_emb.shape == (48, H)
    assert torch.equal(new_out[:V_OLD], emb) and torch.equal(new_emb[:V_OLD], emb)
    torch.testing.assert_close(new_emb[V_OLD], emb[[1, 2]].mean(0))
    torch.testing.assert_close(new_out[V_OLD], emb.double().mean(0).float(), rtol=0, atol=0.02)
    with pytest.raises(ConfigError, match=r"^output rows init mean_noise \(plan.output_init, --output-init\)"):
        resize_embeddings(emb, emb, VocabResizePlan(old_vocab_size=V_OLD, sources=(), output_init="mean_noise"))


def test_untie_a_tied_hf_model_end_to_end(tmp_path):
    """tools/expand_vocab.py's resize of a tied transformers model: saved and reloaded untied."""
    import importlib.util

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from launch import REPO

    spec = importlib.util.spec_from_file_location("expand_vocab_cli", REPO / "tools" / "expand_vocab.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V_OLD, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    old = model.get_input_embeddings().weight.detach().clone()
    p = VocabResizePlan(old_vocab_size=V_OLD, sources=((1, 2), (3,)), output_init="mean_noise", untie=True,
                        divisible_by=1)  # fmt: skip
    cli.resize_hf_causal_lm(model, p)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    emb, head = back.get_input_embeddings().weight, back.get_output_embeddings().weight
    assert not back.config.tie_word_embeddings and emb.data_ptr() != head.data_ptr()
    assert torch.equal(emb[:V_OLD], old) and torch.equal(head[:V_OLD], old)
    torch.testing.assert_close(emb[V_OLD], old[[1, 2]].mean(0))
    torch.testing.assert_close(head[V_OLD], old.double().mean(0).float(), rtol=0, atol=0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init": "focus"}, r"^vocab resize init focus has 0 combinations for 2 appended tokens \(plan.combinations\)"),
        ({"init": "omp", "combinations": (((99, 1.0),), ())}, r"^combinations\[0\] \(new id 40\) has pairs"),
        ({"noise": -1.0}, r"^vocab resize noise -1.0 \(plan.noise\): expected a finite number >= 0"),
        ({"output_init": "zeros"}, r"^vocab resize init 'zeros' \(plan.output_init\): expected one of"),
    ],
)  # fmt: skip
def test_bad_plans_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        VocabResizePlan(old_vocab_size=V_OLD, sources=((1,), (2,)), **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^overlapping tokens per new token 0 \(--init-k\): expected an integer"):
        AuxSpaceConfig(k=0)


def test_tool_needs_text_for_focus(tmp_path):
    """expand_vocab --init focus without text for its auxiliary space: one line, exit 2, no work."""
    import subprocess
    import sys

    from launch import REPO

    spm = tmp_path / "add.model"
    spm.write_bytes(b"")
    cmd = [sys.executable, str(REPO / "tools" / "expand_vocab.py"), "--base-tokenizer", str(tmp_path),
           "--addition-model", str(spm), "--output-dir", str(tmp_path / "out"), "--init", "focus"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "expand_vocab.py: error: --init focus: builds its auxiliary space from target-language text; expected "
        "--aux-text FILE (or --train-text)"
    ]
    assert not (tmp_path / "out").exists()
