"""Where the kernels find a weight's packed words and group scales in memory.

The format stores packed codes row-major, [N, W] int32 words. A tensor-core tile reads [BN rows, BK/CPW words]
a trip: for ternary g32 (BK = 32) two words, 8 bytes, of each of 64 rows 1 KB apart, so every row costs its own
32-byte sector and L2 request; the one-byte group scales qa/qm [N, G], one per row a trip, likewise (Nsight
Compute, 4096->28672 at M = 64: 16 sectors per warp-wide load where 1-4 would do, L2 tag lookups 80% busy,
DRAM 10%: KERNEL_NOTES v27). The kernels therefore read

- packed words row-major with any strides ([N, W]), or in contiguous chunks of RC rows x VW words,
  [N/RC, W/VW, RC, VW]: words VW*v .. VW*v + VW-1 of rows RC*c .. RC*c + RC-1 side by side, so a GEMM trip over VW
  words reads RC*VW*4 contiguous bytes per chunk, and a thread's VW words of one row stay one vector load (the
  GEMV and the prefill unpack keep their K-major registers);
- group scales by their (row, group) strides: [N, G] row-major or N-major ([G, N] storage), so a tile's
  one-byte scales of BN rows are BN contiguous bytes.

"chunks" takes VW = the packed GEMM's K tile in words (at most 4: `tiles.chunk_words`). Measured on the H100
(KERNEL_NOTES v28): the GEMM at M = 64 1.9-2.2x faster on the wide shapes, the GEMV 1.3-1.8x slower (likely, not
measured: a warp's words of one row span 16 chunks, 4x the sectors of a row-major run), and Llama-3-8B-shape
decode served +13% at bs = 64 but -17% at bs = 1 (one VW = 1 column measured the same as VW = 2 and was dropped).
"""

from __future__ import annotations

import os

import torch

from .tiles import chunk_words

ROW_CHUNK = 8  # rows a chunk: 8 rows x 1 word = one 32-byte sector
LAYOUTS = ("rows", "chunks")  # the format's row-major tensors; RC x VW chunks (+ N-major scales)
# what TritonKernel keeps: "rows" by default (faster at bs = 1..8, the GEMV's sizes); TWLA_WEIGHT_LAYOUT=chunks in
# the environment of `vllm serve` (read at import, as TWLA_PDL) trades bs = 1 for throughput at bs >= 16; "wide"
# chunks only the weights with N >= WIDE_RATIO * K (Llama's fused gate/up), where the op tables' M = 64 gain was
# largest against the smallest bs = 1 loss (KERNEL_NOTES v28 outcome)
SERVED_CHOICES = LAYOUTS + ("wide",)
WIDE_RATIO = 2
SERVED_LAYOUT = os.environ.get("TWLA_WEIGHT_LAYOUT", "rows")
if SERVED_LAYOUT not in SERVED_CHOICES:
    raise ValueError(f"TWLA_WEIGHT_LAYOUT={SERVED_LAYOUT!r}: expected one of {', '.join(SERVED_CHOICES)}")
# words a row keeps together in a chunk, for measurements (TWLA_CHUNK_WORDS, read at import; default: the GEMM's K
# tile, `tiles.chunk_words`): wider runs of one row suit the GEMV (a warp's loads span fewer sectors), narrower
# ones the GEMM's trips (KERNEL_NOTES v28 outcome)
_CHUNK_WORDS = os.environ.get("TWLA_CHUNK_WORDS") or "0"
if _CHUNK_WORDS not in ("0", "1", "2", "4", "8", "16", "32"):  # named even when it is no number
    raise ValueError(f"TWLA_CHUNK_WORDS={_CHUNK_WORDS}: expected a power of two from 1 to 32")
CHUNK_WORDS = int(_CHUNK_WORDS)


def as_chunks(packed: torch.Tensor) -> torch.Tensor:
    """[N, W] (any strides) -> the view [N, W, 1, 1]; a [N/RC, W/VW, RC, VW] chunked tensor as it is."""
    if packed.dim() == 2:
        return packed[:, :, None, None]
    if packed.dim() != 4:
        raise ValueError(f"packed words must be [N, W] or [N/RC, W/VW, RC, VW], got shape {tuple(packed.shape)}")
    return packed


def packed_rows(packed: torch.Tensor) -> int:
    """Weight rows N of packed words in either form."""
    return packed.shape[0] * (packed.shape[2] if packed.dim() == 4 else 1)


def packed_words(packed: torch.Tensor) -> int:
    """Words W of each row in either form."""
    return packed.shape[1] * (packed.shape[3] if packed.dim() == 4 else 1)


def row_chunks(packed: torch.Tensor, rows: int = ROW_CHUNK, words: int = 1) -> torch.Tensor:
    """Row-major [N, W] words -> contiguous [N/rows, W/words, rows, words] (N a multiple of rows, W of words)."""
    n, w = packed.shape
    if n % rows or w % words:
        raise ValueError(f"[{n}, {w}] words do not split into chunks of {rows} rows x {words} words")
    return packed.view(n // rows, rows, w // words, words).permute(0, 2, 1, 3).contiguous()


def n_major(t: torch.Tensor) -> torch.Tensor:
    """[N, C] with the same values, stored column by column ([C, N] contiguous underneath)."""
    return t.t().contiguous().t()


def chunk_rows(packed: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows `rows` (whole chunks) of packed words in either form."""
    if packed.dim() == 2 or rows == slice(None):
        return packed[rows]
    rc = packed.shape[2]
    start, stop = rows.start or 0, packed_rows(packed) if rows.stop is None else rows.stop
    if start % rc or stop % rc:
        raise ValueError(f"rows {start}:{stop} do not start and end on {rc}-row chunks")
    return packed[start // rc:stop // rc]


def resident(packed: torch.Tensor, qa: torch.Tensor, qm: torch.Tensor, bits: int, group_size: int,
             layout: str = "", chunk: int = ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight's packed words (B = bits codes, group_size weights a group, -1: one group a row) and group scales
    laid out for the kernels (`LAYOUTS`, or "wide": chunks where N >= WIDE_RATIO * K; default SERVED_LAYOUT). The
    chunked layouts fall back to row-major words where N is not a multiple of `chunk` (scales N-major either way).
    Same values in every layout, so the kernels' outputs are equal bit for bit. Each tensor is dense in its layout
    (no gaps between rows), so a caller may keep it as it is."""
    n, w = packed.shape
    k = w * 32 // bits
    layout = layout or SERVED_LAYOUT
    if layout == "wide":
        layout = "chunks" if n >= WIDE_RATIO * k else "rows"
    if layout == "rows":
        return packed.contiguous(), qa.contiguous(), qm.contiguous()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}: one of {', '.join(SERVED_CHOICES)}")
    vw = chunk_words(bits, k if group_size == -1 else group_size, w, CHUNK_WORDS)
    words = row_chunks(packed, chunk, vw) if chunk > 1 and n % chunk == 0 else packed
    return words, n_major(qa), n_major(qm)


def word_strides(packed: torch.Tensor) -> tuple[int, int]:
    """(row or chunk, word or word-vector) strides of packed words as the kernels take them: [N, W] any strides
    ([N, W, 1, 1] from `as_chunks`); chunks [N/RC, W/VW, RC, VW] must be contiguous within a chunk (the kernels
    use the constants RC*VW, VW, 1 for those strides)."""
    if packed.dim() == 4 and packed.shape[2] > 1:
        rc, vw = packed.shape[2:]
        # (a size-1 dimension's stride is arbitrary: torch may leave one chunk per row block with any)
        if packed.stride()[2:] != (vw, 1) or packed.shape[1] > 1 and packed.stride(1) != rc * vw:
            raise ValueError(f"row chunks {tuple(packed.shape)} with strides {packed.stride()}: each chunk must be "
                             f"contiguous (strides (., {rc * vw}, {vw}, 1)); use layout.row_chunks")
    return packed.stride(0), packed.stride(1)


def scale_strides(qa: torch.Tensor, qm: torch.Tensor) -> tuple[int, int]:
    """(row, group) strides shared by qa and qm: the kernels index both with one offset."""
    if qa.shape != qm.shape or qa.stride() != qm.stride():
        raise ValueError(f"qa {tuple(qa.shape)} strides {qa.stride()} and qm {tuple(qm.shape)} strides {qm.stride()} "
                         "must share shape and layout")
    return qa.stride(0), qa.stride(1)
