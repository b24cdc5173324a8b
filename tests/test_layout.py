"""The kernels' weight layouts (`triton_ops.layout`): same values in every layout, shard slicing on chunks, clear
errors for tensors the kernels cannot read. (The kernels on each layout: tests/triton_check.py, interpreter.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from twla_vllm.kernels.triton_ops import layout as L

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under t, as the flat array its strides index."""
    return torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


def word_at(packed: torch.Tensor, row: int, word: int) -> int:
    """Word `word` of row `row` read the way the kernels address it (`unpack._row_offsets`, `_word_offsets`)."""
    p = L.as_chunks(packed)
    rc, vw = p.shape[2:]
    s_row, s_word = L.word_strides(p)
    if rc > 1:
        offset = (row // rc) * s_row + (word // vw) * s_word + (row % rc) * vw + word % vw
    else:
        offset = row * s_row + word * s_word
    return int(storage(p)[p.storage_offset() + offset])


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("bits,group_size,words,vw", [(2, 32, 6, 2), (4, 128, 12, 4), (4, 128, 6, 2), (1, 32, 6, 1)])
def test_every_layout_holds_the_same_words_and_scales(layout, bits, group_size, words, vw):
    packed = torch.randint(-2**31, 2**31 - 1, (24, words), dtype=torch.int32)
    groups = words * 32 // bits // group_size or 1
    qa = torch.randint(-127, 128, (24, groups), dtype=torch.int8)
    qm = torch.randint(-127, 128, (24, groups), dtype=torch.int8)
    p, a, m = L.resident(packed, qa, qm, bits, group_size, layout)
    assert L.packed_rows(p) == 24 and L.packed_words(p) == words
    assert all(word_at(p, r, w) == packed[r, w] for r in range(24) for w in range(words))
    assert torch.equal(a, qa) and torch.equal(m, qm)
    s_row, s_group = L.scale_strides(a, m)
    assert all(storage(a)[r * s_row + g * s_group] == qa[r, g] for r in range(24) for g in range(groups))
    if layout != "rows":  # VW: the packed GEMM's K tile in words, <= 4, dividing the row (tiles.chunk_words)
        assert p.shape == (3, words // vw, 8, vw)
        assert a.stride(0) == 1


def test_chunks_fall_back_to_rows_where_n_is_not_a_multiple():
    packed = torch.arange(20 * 4, dtype=torch.int32).view(20, 4)
    p, _, _ = L.resident(packed, torch.zeros(20, 2, dtype=torch.int8), torch.zeros(20, 2, dtype=torch.int8), 2, 32,
                         "chunks")
    assert p.dim() == 2 and torch.equal(p, packed)


@pytest.mark.parametrize("vw", [1, 2])
def test_shard_rows_of_chunks(vw):
    packed = torch.arange(32 * 4, dtype=torch.int32).view(32, 4)
    p = L.row_chunks(packed, 8, vw)
    shard = L.chunk_rows(p, slice(8, 24))
    assert L.packed_rows(shard) == 16
    assert all(word_at(shard, r, w) == packed[8 + r, w] for r in range(16) for w in range(4))
    with pytest.raises(ValueError, match="4:24 do not start and end on 8-row chunks"):
        L.chunk_rows(p, slice(4, 24))


def test_one_chunk_a_row_block_is_readable_whatever_its_stride():
    p = L.row_chunks(torch.arange(16 * 8, dtype=torch.int32).view(16, 8), 8, 8)  # [2, 1, 8, 8]
    assert L.word_strides(p) == (p.stride(0), p.stride(1))


def test_unreadable_tensors_are_refused_by_name():
    p = L.row_chunks(torch.zeros(16, 4, dtype=torch.int32), 8, 2).transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="each chunk must be contiguous"):
        L.word_strides(p)
    with pytest.raises(ValueError, match=r"\[12, 4\] words do not split into chunks of 8 rows x 2 words"):
        L.row_chunks(torch.zeros(12, 4, dtype=torch.int32), 8, 2)
    with pytest.raises(ValueError, match="qa .* and qm .* must share shape and layout"):
        L.scale_strides(torch.zeros(4, 2, dtype=torch.int8), L.n_major(torch.zeros(4, 2, dtype=torch.int8)))
    with pytest.raises(ValueError, match="unknown weight layout 'tiles'"):
        L.resident(torch.zeros(8, 2, dtype=torch.int32), torch.zeros(8, 1, dtype=torch.int8),
                   torch.zeros(8, 1, dtype=torch.int8), 2, 32, "tiles")


def test_environment_picks_the_served_layout_and_rejects_others():
    code = "from twla_vllm.kernels.triton_ops import layout; print(layout.SERVED_LAYOUT)"
    env = {**os.environ, "TWLA_WEIGHT_LAYOUT": "chunks"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "chunks", out.stderr
    env["TWLA_WEIGHT_LAYOUT"] = "tiles"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "TWLA_WEIGHT_LAYOUT='tiles': expected one of rows, chunks, wide" in out.stderr


def test_wide_chunks_only_weights_much_wider_than_deep():
    # ternary: 16 codes a word, so 16 words a row = K 256; N >= 2K (gate/up-like) -> chunks, else row-major
    def kept(n):
        scales = torch.zeros(n, 8, dtype=torch.int8)
        return L.resident(torch.zeros(n, 16, dtype=torch.int32), scales, scales, 2, 32, "wide")[0].dim()
    assert kept(512) == 4 and kept(504) == 2 and kept(256) == 2


def test_environment_sets_a_chunks_words_and_rejects_others():
    code = ("import torch; from twla_vllm.kernels.triton_ops import layout as L; "
            "z = torch.zeros(16, 1, dtype=torch.int8); "
            "print(L.resident(torch.zeros(16, 256, dtype=torch.int32), z, z, 2, 32, 'chunks')[0].shape)")
    env = {**os.environ, "TWLA_CHUNK_WORDS": "8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "torch.Size([2, 32, 8, 8])", out.stderr  # ternary g32's own VW would be 2
    env["TWLA_CHUNK_WORDS"] = "3"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "TWLA_CHUNK_WORDS=3: expected a power of two from 1 to 32" in out.stderr


def test_the_kernel_benchmark_lays_out_its_copies_in_every_layout():
    # benchmarks/kernels.py runs only on a GPU; a layout name it passed wrong once cost a lease (session 30)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from kernels import laid_out

    from twla_vllm import format as fmt

    packed = torch.randint(-2**31, 2**31 - 1, (16, 8), dtype=torch.int32)
    qa, qm = torch.ones(16, 4, dtype=torch.int8), torch.zeros(16, 4, dtype=torch.int8)
    for layout in (None,) + L.LAYOUTS:  # None: the default, what every served column uses
        args = (packed, None, qa, qm, None, fmt.CODES["ternary"], 32) + (() if layout is None else (layout,))
        p, _, a, m, _ = laid_out(*args)
        assert L.packed_rows(p) == 16 and L.packed_words(p) == 8 and torch.equal(a, qa) and torch.equal(m, qm)
