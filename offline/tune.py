"""Block-wise scale tuning, the last stage before export: every decoder block's group scales and offsets are tuned
by gradient descent so that the quantized block, fed the quantized model's own hidden states, reproduces what the
dense block gives on the dense model's hidden states.

GPTQ and the stage-2 solve fit each linear alone, on 16-bit inputs; the served model rounds every activation and
each block inherits the errors of those before it. Here, per block and in order,

    min over (alpha, mu) of  mean || block_q(X_q) - block_dense(X_dense) ||²

with X_q the quantized model's input to the block (activation bits and clips as allocated), X_dense the dense
model's. Codes, transforms, activation bits and clips stay fixed; activations are fake-quantized with a
straight-through gradient. Per (row, group): alpha = alpha0 * exp(rho), mu = mu0 + |alpha0| * nu, starting at
rho = nu = 0 (the stored layer), Adam with a cosine schedule over `epochs` passes of the calibration windows. The
result is projected back onto format v2's integer grid (a fresh row scale, then of the 3 x 3 integer neighbours the
one nearest the tuned weights), and a block whose error did not drop keeps its old scales.
"""

from __future__ import annotations

import torch

from twla_vllm.reference import fake_quant_per_token, kron_rotate
from twla_vllm.simulate import QuantWeight, SimTwlaLinear, replace_linear

from .calibrate import BlockInputs, call_block, run_block
from .onload import cuda_matmul_precision
from .weights import row_scale_for, to_int_grid


def fake_quant_ste(x: torch.Tensor, bits: int, clip: float, ranges: int) -> torch.Tensor:
    """Per-token quantize-dequantize of x [M, K] (as served) whose gradient passes straight through."""
    with torch.no_grad():
        xq = fake_quant_per_token(x, bits, clip, ranges)
    return x + (xq - x).detach()


class ScaleTunedLinear(torch.nn.Module):
    """A `SimTwlaLinear` with trainable continuous group scale and offset (module docstring); `to_sim()` gives the
    layer back on the integer grid."""

    def __init__(self, sim: SimTwlaLinear):
        super().__init__()
        self.sim = sim
        w = sim.weight
        n, k = w.codes.shape
        g = w.group_scale.shape[1]
        self.values = w.code.values(w.codes).float().view(n, g, k // g)
        s = sim.row_scale.float().view(n, 1)
        self.alpha0 = w.group_scale.float() * s
        self.mu0 = w.group_offset.float() * s
        self.step = self.alpha0.abs().clamp(min=1e-8)
        self.rho = torch.nn.Parameter(torch.zeros(n, g))
        self.nu = torch.nn.Parameter(torch.zeros(n, g))

    def alpha_mu(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha0 * torch.exp(self.rho), self.mu0 + self.step * self.nu

    def weight(self) -> torch.Tensor:
        alpha, mu = self.alpha_mu()
        n, g, gs = self.values.shape
        return (self.values * alpha[..., None] + mu[..., None]).view(n, g * gs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`reference.quant_linear` with float weights in place of the integer GEMM, so gradients reach rho, nu."""
        sim = self.sim
        x2 = x.reshape(-1, x.shape[-1]).float()
        xq = fake_quant_ste(kron_rotate(x2, sim.left, sim.right), sim.act_bits, sim.act_clip, sim.rowsum.shape[1])
        y = xq @ self.weight().t()
        if sim.lowrank_a is not None:
            y = y + (x2 @ sim.lowrank_b.t()) @ sim.lowrank_a.t()
        if sim.bias is not None:
            y = y + sim.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    @torch.no_grad()
    def to_sim(self) -> SimTwlaLinear:
        sim, w = self.sim, self.sim.weight
        alpha, mu = self.alpha_mu()
        alpha = alpha.clamp(min=0)
        s = row_scale_for(alpha, mu, w.code)
        n, g, gs = self.values.shape
        qa, qm = to_int_grid(self.weight().view(n * g, gs), self.values.reshape(n * g, gs), alpha.reshape(-1, 1),
                             mu.reshape(-1, 1), s.repeat_interleave(g, 0), w.code)
        qw = QuantWeight(w.codes, w.code, s.reshape(-1), qa.view(n, g).to(torch.int8), qm.view(n, g).to(torch.int8))
        return SimTwlaLinear(qw, sim.left, sim.right, sim.act_bits, sim.act_clip, sim.act_ranges, sim.bias,
                             sim.lowrank_a, sim.lowrank_b)


def block_error(outputs: BlockInputs, target: BlockInputs) -> float:
    """Mean squared error of a block's `outputs` against `target`, over every calibration window."""
    err = [float(((y_hat.float() - y.float()) ** 2).mean()) for y_hat, y in zip(outputs.hidden, target.hidden)]
    return sum(err) / len(err)


def tune_block(layer: torch.nn.Module, inputs: BlockInputs, target: BlockInputs, epochs: int, lr: float,
               seed: int = 0) -> tuple[float, float, BlockInputs]:
    """Tune the scales of every `SimTwlaLinear` in `layer` in place; (error before, error after, the block's
    outputs on `inputs`, which the next block reads). A block whose error does not drop is left as it was."""
    before = block_error(run_block(layer, inputs), target)
    sims = {name: m for name, m in layer.named_modules() if isinstance(m, SimTwlaLinear)}
    tuned = {name: ScaleTunedLinear(m) for name, m in sims.items()}
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name, m in tuned.items():
        replace_linear(layer, name, m)
    params = [p for m in tuned.values() for p in (m.rho, m.nu)]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(inputs.hidden)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    # TF32 for the descent only: the errors that decide whether a block keeps its tuned scales are full float32
    with torch.enable_grad(), cuda_matmul_precision("tf32"):
        for _ in range(epochs):
            for i in torch.randperm(len(inputs.hidden), generator=gen, device="cpu").tolist():
                out = call_block(layer, inputs.hidden[i], inputs.kwargs)
                loss = ((out.float() - target.hidden[i].float()) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    for name, m in tuned.items():
        replace_linear(layer, name, m.to_sim())
    for p in frozen:
        p.requires_grad_(True)
    outputs = run_block(layer, inputs)
    after = block_error(outputs, target)
    if after < before:
        return before, after, outputs
    for name, m in sims.items():  # no gain: the stored scales stay (the outputs are recomputed, a rare case)
        replace_linear(layer, name, m)
    return before, before, run_block(layer, inputs)
