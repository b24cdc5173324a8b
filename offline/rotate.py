"""Rotate stage: Kronecker factor sizes, KOTMS (learned tri-modal rotations), random orthogonal factors
(synthetic checkpoints, baselines), and exact fp folds (RMSNorm γ, o_proj head factor into v_proj)."""

from __future__ import annotations

import math

import torch


def balanced_factors(k: int, blocks: int = 1) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = k, n1 divisible by `blocks`, as close to square as possible
    (balanced factors keep the online rotation cheap: K * (n1 + n2) MACs per token)."""
    best = None
    for n1 in range(1, k + 1):
        if k % n1 or n1 % blocks:
            continue
        n2 = k // n1
        cost = n1 + n2
        if best is None or cost < best[0]:
            best = (cost, n1, n2)
    if best is None:
        raise ValueError(f"K={k} has no factor pair with n1 divisible by {blocks}")
    return best[1], best[2]


def reference_factors(k: int, n: int, blocks: int = 1) -> tuple[int, int]:
    """The TWLA code's factor rule: r = the largest divisor of K with r <= floor(sqrt(N*K/64)) (rotation storage
    <= 1/4 bit per weight in fp16), (n1, n2) = (K / r, r); n1 must be divisible by `blocks`."""
    r0 = math.isqrt(n * k // 64)
    for r in range(min(r0, k), 0, -1):
        if k % r == 0 and (k // r) % blocks == 0:
            return k // r, r
    raise ValueError(f"K={k} has no factor pair with n1 divisible by {blocks}")


def fold_weight(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The weight side of an online transform x' = vec(L X R) (P = L ⊗ Rᵀ): W' = W P⁻¹, i.e. per row
    L⁻ᵀ W R⁻ᵀ, so that W' x' = W x. For orthogonal factors this is L W R (`reference.rotate_weight`)."""
    n1, n2 = left.shape[0], right.shape[0]
    w3 = w.float().reshape(-1, n1, n2)
    if _is_orthogonal(left) and _is_orthogonal(right):
        return torch.matmul(torch.matmul(left, w3), right).reshape(w.shape)
    lt_inv = torch.linalg.inv(left.double()).t().float()
    rt_inv = torch.linalg.inv(right.double()).t().float()
    return torch.matmul(torch.matmul(lt_inv, w3), rt_inv).reshape(w.shape)


def unfold_weight(w_folded: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Inverse of `fold_weight`: W = Lᵀ W' Rᵀ per row, for any invertible factors (the folded weight back in
    the original basis)."""
    n1, n2 = left.shape[0], right.shape[0]
    w3 = w_folded.float().reshape(-1, n1, n2)
    return torch.matmul(torch.matmul(left.t(), w3), right.t()).reshape(w_folded.shape)


def _is_orthogonal(m: torch.Tensor) -> bool:
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    return bool((m.double() @ m.double().t() - eye).abs().max() < 1e-4)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), drawn on the CPU (the same seed gives
    the same matrix whatever the device) and returned on the default device."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float().contiguous().to(torch.get_default_device())


def block_diagonal_orthogonal(n: int, blocks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthogonal n x n made of `blocks` independent diagonal blocks: such a left factor never mixes
    the K-shards of a row-parallel layer, so the layer can run with tensor parallel size | blocks."""
    if n % blocks:
        raise ValueError(f"n={n} not divisible by blocks={blocks}")
    return torch.block_diag(*[random_orthogonal(n // blocks, generator) for _ in range(blocks)])


def orthogonality_error(m: torch.Tensor) -> float:
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    return float((m.double() @ m.double().t() - eye).abs().max())


# --------------------------------------------------------------------------------------------
# KOTMS: Kronecker orthogonal rotation learned to make weights tri-modal (data-free)
# --------------------------------------------------------------------------------------------
def cayley(s: torch.Tensor) -> torch.Tensor:
    """Orthogonal (I + A)^-1 (I - A) with A = S - Sᵀ skew-symmetric; S = 0 gives the identity."""
    a = s - s.transpose(-1, -2)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(a)
    return torch.linalg.solve(eye + a, eye - a)


def trimodal_loss(w: torch.Tensor, group_size: int, balance_w: float = 0.1, sigma_ratio: float = 0.25) -> torch.Tensor:
    """Negative log-likelihood of centred weights under ⅓N(-c,σ²) + ⅓N(0,σ²) + ⅓N(c,σ²) per (row, group),
    c = mean|x| (detached), σ = 0.25c, plus a balance term pulling mean responsibilities to ⅓ each."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    x = w.reshape(n, k // gs, gs)
    x = x - x.mean(-1, keepdim=True)
    c = x.abs().mean(-1, keepdim=True).detach().clamp(min=1e-8)
    sigma = sigma_ratio * c
    comps = torch.stack([-(x + c) ** 2, -(x ** 2), -(x - c) ** 2], dim=-1) / (2 * sigma.unsqueeze(-1) ** 2)
    log_norm = -torch.log(sigma.unsqueeze(-1)) - 0.5 * math.log(2 * math.pi) - math.log(3)
    logp = torch.logsumexp(comps + log_norm, dim=-1)
    resp = torch.softmax(comps, dim=-1).reshape(-1, 3).mean(0)
    return -logp.mean() + balance_w * ((resp - 1 / 3) ** 2).sum()


def learn_kronecker_rotation(w: torch.Tensor, n1: int, n2: int, group_size: int, iters: int = 100,
                             lr: float = 1e-2, left_blocks: int = 1, learn_left: bool = True,
                             rows_per_step: int = 128, seed: int = 0,
                             ) -> tuple[torch.Tensor | None, torch.Tensor, list[float]]:
    """KOTMS on the (stacked) weights that read one input: returns (C or None, B, loss history), with
    C block-diagonal with `left_blocks` blocks (shard-local under tensor parallelism).

    The rotation acts on K only, so output rows are independent samples of the objective: each Adam
    step uses `rows_per_step` random rows (an unbiased estimate; ~10x cheaper on MLP weights)."""
    w = w.detach().float()
    gen = torch.Generator().manual_seed(seed)
    s_left = torch.zeros(left_blocks, n1 // left_blocks, n1 // left_blocks, requires_grad=learn_left)
    s_right = torch.zeros(n2, n2, requires_grad=True)
    params = [s_right] + ([s_left] if learn_left else [])
    opt = torch.optim.Adam(params, lr=lr)
    history = []

    def factors():
        b = cayley(s_right)
        c = torch.block_diag(*cayley(s_left).unbind(0)) if learn_left else None
        return c, b

    for _ in range(iters):
        c, b = factors()
        rows = w
        if w.shape[0] > rows_per_step:  # a random row sample per step (draws only then: the seed's stream)
            rows = w[torch.randint(0, w.shape[0], (rows_per_step,), generator=gen, device="cpu")]
        wr = rows.reshape(-1, n1, n2)
        wr = (wr if c is None else torch.matmul(c, wr)) @ b
        loss = trimodal_loss(wr.reshape(rows.shape), group_size)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    with torch.no_grad():
        c, b = factors()
    return (None if c is None else c.contiguous()), b.contiguous(), history


def fold_norm_into(linears: list[torch.nn.Linear], norm: torch.nn.Module) -> None:
    """RMSNorm(x)·γ then W  ==  RMSNorm(x) then W·diag(γ): move γ into the consumers, set γ = 1."""
    gamma = norm.weight.data.float()
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * gamma).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def fold_head_rotation(v_proj: torch.nn.Linear, o_proj: torch.nn.Linear, b: torch.Tensor, head_dim: int) -> None:
    """o_proj's head-local right factor B, moved offline: each head's value output becomes v·B (rows of
    v_proj: W_v,h <- Bᵀ W_v,h, bias too), o_proj columns per head: W_o,h <- W_o,h B. Exact in fp."""
    wv = v_proj.weight.data.float()
    kv = wv.shape[0] // head_dim
    v_proj.weight.data = (b.t() @ wv.reshape(kv, head_dim, -1)).reshape(wv.shape).to(v_proj.weight.dtype)
    if v_proj.bias is not None:
        bv = v_proj.bias.data.float().reshape(kv, head_dim, 1)
        v_proj.bias.data = (b.t() @ bv).reshape(-1).to(v_proj.bias.dtype)
    wo = o_proj.weight.data.float()
    heads = wo.shape[1] // head_dim
    o_proj.weight.data = (wo.reshape(-1, heads, head_dim) @ b).reshape(wo.shape).to(o_proj.weight.dtype)
