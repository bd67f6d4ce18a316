"""The extended text position table and the alignment text tower. Guards against off-by-one rows
in the 77->248 stretch and against reading the wrong one of the two stored tables."""

from __future__ import annotations

import pytest
import torch

from ppllava.alignment import KEEP, ExtendedTextEmbeddings, extend_position_table, extended_length

pytestmark = pytest.mark.numerics  # floating-point verdicts: CI reruns them under ATEN_CPU_CAPABILITY=default


def test_extended_lengths():
    assert extended_length(77) == 248
    assert extended_length(64) == 196


def test_position_table_matches_formula_row_by_row():
    torch.manual_seed(0)
    for n in (77, 64):
        E = torch.randn(n, 8, dtype=torch.float64)
        out = extend_position_table(E)
        assert out.shape == (4 * n - 60, 8)
        for r in range(out.shape[0]):
            if r < 20:
                want = E[r]
            elif r < 20 + 4 * (n - 21):
                i, k = divmod(r - 20, 4)
                want = E[20 + i] * (4 - k) / 4 + E[21 + i] * k / 4
            else:
                k = r - (out.shape[0] - 4)
                want = E[n - 1] + k * (E[n - 1] - E[n - 2]) / 4
            torch.testing.assert_close(out[r], want, rtol=0, atol=1e-12, msg=f"row {r} of {n}->{out.shape[0]}")


def test_embeddings_read_both_tables():
    emb = ExtendedTextEmbeddings(vocab_size=10, width=4, positions=248)
    with torch.no_grad():
        emb.token_embedding.weight.zero_()
        emb.position_embedding.copy_(torch.arange(248.0)[:, None].expand(248, 4))
        emb.position_embedding_res.copy_(-torch.arange(248.0)[:, None].expand(248, 4))
    out = emb(input_ids=torch.zeros(1, 30, dtype=torch.long))
    assert torch.equal(out[0, :KEEP, 0], torch.arange(float(KEEP)))
    assert torch.equal(out[0, KEEP:, 0], -torch.arange(float(KEEP), 30.0))


def test_text_embedding_is_normalised_and_pools_at_eot(tiny_models):
    model = tiny_models["vicuna"]
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 20])
    t = model.text_embedding(ids)
    assert t.shape == (1, 16)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(1))
    # CLIP (legacy eos id 2) pools at the first maximum id, the first EOT: padding after it is invisible
    # to a causal text tower, so more padding gives the same embedding.
    t_short = model.text_embedding(ids[:, :7])
    torch.testing.assert_close(t, t_short, rtol=0, atol=1e-6)


def test_siglip_text_embedding_pools_last_position(tiny_models):
    model = tiny_models["qwen"]
    ids = torch.randint(3, 1000, (1, 196), generator=torch.Generator().manual_seed(0))
    t = model.text_embedding(ids)
    assert t.shape == (1, 32)
    changed = ids.clone()
    changed[0, -1] = 5 if ids[0, -1] != 5 else 6
    assert not torch.allclose(model.text_embedding(changed), t)
