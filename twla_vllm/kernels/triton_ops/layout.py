"""Where the kernels find a weight's packed words and group scales in memory.

The format stores packed codes row-major, [N, W] int32 words. A tensor-core tile reads [BN rows, BK/CPW words]
a trip: for ternary g32 (BK = 32) two words, 8 bytes, of each of 64 rows 1 KB apart, so every row costs its own
32-byte sector and L2 request; the one-byte group scales qa/qm [N, G], one per row a trip, likewise (Nsight
Compute, 4096->28672 at M = 64: 16 sectors per warp-wide load where 1-4 would do, L2 tag lookups 80% busy,
DRAM 10%: KERNEL_NOTES v27). The kernels therefore read

- packed words row-major with any strides ([N, W]; N-major too), or in contiguous chunks of RC rows,
  [N/RC, W, RC]: word w of rows RC*c .. RC*c + RC-1 side by side, so a GEMM trip reads RC*4 contiguous bytes
  per chunk and word, and the GEMV (RC rows, many words) one contiguous run;
- group scales by their (row, group) strides: [N, G] row-major or N-major ([G, N] storage), so a tile's
  one-byte scales of BN rows are BN contiguous bytes.
"""

from __future__ import annotations

import os

import torch

ROW_CHUNK = 8  # rows a chunk: 8 words = one 32-byte sector per packed word index
LAYOUTS = ("rows", "chunks", "n-major")  # the format's row-major tensors; 8-row chunks + N-major scales; all N-major
# what TritonKernel keeps: "rows", the layout of every GPU measurement so far. "chunks" (v27) is predicted to
# cut the M = 16..128 GEMM's L2 requests ~3x but has not yet run on a GPU: flip after `kernel_tables.sh layout`
# (op tables on all three layouts + the quick GPU check) shows it equal and faster. TWLA_WEIGHT_LAYOUT in the
# environment (read at import, as TWLA_PDL) picks another for comparisons (benchmarks/serve.py's "+chunks")
SERVED_LAYOUT = os.environ.get("TWLA_WEIGHT_LAYOUT", "rows")
if SERVED_LAYOUT not in LAYOUTS:
    raise ValueError(f"TWLA_WEIGHT_LAYOUT={SERVED_LAYOUT!r}: expected one of {', '.join(LAYOUTS)}")


def as_chunks(packed: torch.Tensor) -> torch.Tensor:
    """[N, W] (any strides) -> the view [N, W, 1]; a [N/RC, W, RC] chunked tensor as it is."""
    if packed.dim() == 2:
        return packed.unsqueeze(2)
    if packed.dim() != 3:
        raise ValueError(f"packed words must be [N, W] or [N/RC, W, RC], got shape {tuple(packed.shape)}")
    return packed


def packed_rows(packed: torch.Tensor) -> int:
    """Weight rows N of packed words in either form."""
    return packed.shape[0] * (packed.shape[2] if packed.dim() == 3 else 1)


def row_chunks(packed: torch.Tensor, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """Row-major [N, W] words -> contiguous [N/chunk, W, chunk] (N a multiple of chunk)."""
    n, w = packed.shape
    if n % chunk:
        raise ValueError(f"{n} rows are not a multiple of the {chunk}-row chunk")
    return packed.view(n // chunk, chunk, w).transpose(1, 2).contiguous()


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


def resident(packed: torch.Tensor, qa: torch.Tensor, qm: torch.Tensor, layout: str = "",
             chunk: int = ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight's packed words and group scales laid out for the kernels (`LAYOUTS`; default SERVED_LAYOUT).
    "chunks" falls back to row-major words where N is not a multiple of `chunk` (scales N-major either way). Same
    values in every layout, so the kernels' outputs are equal bit for bit. Each tensor is dense in its layout (no
    gaps between rows), so a caller may keep it as it is."""
    layout = layout or SERVED_LAYOUT
    if layout == "rows":
        return packed.contiguous(), qa.contiguous(), qm.contiguous()
    if layout == "n-major":
        return n_major(packed), n_major(qa), n_major(qm)
    if layout != "chunks":
        raise ValueError(f"unknown weight layout {layout!r}: one of {', '.join(LAYOUTS)}")
    words = row_chunks(packed, chunk) if chunk > 1 and packed.shape[0] % chunk == 0 else packed
    return words, n_major(qa), n_major(qm)


def word_strides(packed: torch.Tensor) -> tuple[int, int]:
    """(row or chunk, word) strides of packed words as the kernels take them: [N, W] any strides; chunks
    [N/RC, W, RC] must be contiguous within a chunk (word stride RC, row stride 1: constants in the kernels)."""
    if packed.dim() == 3 and packed.shape[2] > 1 and packed.stride()[1:] != (packed.shape[2], 1):
        raise ValueError(f"row chunks {tuple(packed.shape)} with strides {packed.stride()}: each chunk must be "
                         f"contiguous (strides (., {packed.shape[2]}, 1)); use layout.row_chunks")
    return packed.stride(0), packed.stride(1)


def scale_strides(qa: torch.Tensor, qm: torch.Tensor) -> tuple[int, int]:
    """(row, group) strides shared by qa and qm: the kernels index both with one offset."""
    if qa.shape != qm.shape or qa.stride() != qm.stride():
        raise ValueError(f"qa {tuple(qa.shape)} strides {qa.stride()} and qm {tuple(qm.shape)} strides {qm.stride()} "
                         "must share shape and layout")
    return qa.stride(0), qa.stride(1)
