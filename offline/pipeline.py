"""The TWLA pipeline: calibrate -> rotate -> quantize weights (block by block, resumable) -> allocate bits ->
clip -> tune scales -> export. Each decoder block is quantized on the hidden states the already-quantized blocks
produce, then its state is written to the work directory so a killed run resumes where it stopped (the stages
after the weights run again on resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from twla_vllm import format as fmt
from twla_vllm.reference import kron_rotate
from twla_vllm.simulate import QuantWeight, SimTwlaLinear, replace_linear

from . import allocate, clip, data, lowrank
from .calibrate import (BlockInputs, RotatedLinear, calibration_tokens, capture_first_block_inputs, capture_inputs,
                        decoder_layers, input_gram, quantized_input_grams, run_block)
from .export import write_checkpoint
from .layout import ATTN, MLP_IN, VLLM_MODULE, input_sites, pick_act_blocks, pick_group_size, pick_k_blocks
from .onload import Placement, cuda_matmul_precision
from .recipe import AFTER_WEIGHTS, BEHAVED_BEFORE, Recipe, parse_group_sizes
from .rotate import (balanced_factors, block_diagonal_orthogonal, fold_head_rotation, fold_norm_into, fold_weight,
                     learn_kronecker_rotation, random_orthogonal, reference_factors, unfold_weight)
from .weights import act_aware_target, fit_rtn, gptq_quantize

WEIGHT_STAGES = ("calibrate", "rotate", "weights")  # the resumable stages; the later ones rerun on resume


SITE_INPUT_TOKENS = 4096  # calibration rows handed to transform / low-rank learners that use activations
# weight target "act" regresses the 16-bit output on the quantized inputs (K unknowns per output row): with fewer
# than this many calibration tokens per input channel the fit follows the calibration text's rounding noise, and
# such a site keeps the a16 target (Qwen2.5-1.5B's down_proj, K = 8 960, on the CPU default's 16k tokens)
ACT_TARGET_TOKENS_PER_INPUT = 8


def transform_learner(name: str):
    """The learner of rotation `name`: learner(w, n1, n2, group_size, left_blocks, learn_left, recipe, site_inputs)
    -> (left or None, right, loss history), where w stacks the weights that read the site's input and
    site_inputs() returns up to SITE_INPUT_TOKENS of its calibration rows [T, K] (captured on first call).
    Factors may be any invertible matrices; orthogonal ones fold exactly as rotations."""
    if name == "kotms":
        return lambda w, n1, n2, gs, blocks, learn_left, r, site_inputs: learn_kronecker_rotation(
            w, n1, n2, gs, r.kotms_iters, r.kotms_lr, blocks, learn_left)
    if name == "okt":
        from .okt import learn_okt

        return learn_okt
    if name == "learned":
        from .twinquant import learn_transform

        return learn_transform
    raise ValueError(f"unknown rotation {name!r} (allowed: kotms, okt, learned, random, none)")


def lowrank_fit(name: str):
    """The fit of low-rank method `name`: fit(w, quantize, rank, recipe, site_inputs) -> (QuantWeight, A, B); see
    `lowrank`."""
    if name == "svd":
        return lowrank.fit_svd
    if name == "psp":
        return lowrank.fit_psp
    if name == "learned":
        from .twinquant import fit_lowrank

        return fit_lowrank
    raise ValueError(f"unknown low-rank method {name!r} (allowed: svd, psp, learned)")


def clip_windows(tok, r: Recipe) -> torch.Tensor:
    """The held-out token windows the clip search measures on (never calibration or test text)."""
    heldout = data.load_text(r.calib, "heldout", r.text_column)
    return data.token_windows(tok, heldout, max(1, r.clip_tokens // r.amp_seqlen), r.amp_seqlen, r.seed + 2)


class Quantizer:
    def __init__(self, model, tokenizer, recipe: Recipe, work_dir: str, device: str = "cpu",
                 log=print, offload: bool = False):
        """`model` (float32, anywhere) is placed on `device`, or with `offload` its decoder blocks stay in CPU
        memory and visit the device one at a time (onload.py)."""
        cfg = model.config
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        recipe = recipe.resolved(device, max(self.hidden, self.inter, self.heads * self.head_dim))
        self.model, self.tok, self.r, self.work, self.device, self.log = model, tokenizer, recipe, work_dir, device, log
        self.place = Placement(device, offload)
        self.place.place(model, decoder_layers(model))
        self.gs = pick_group_size([self.hidden, self.heads * self.head_dim, self.inter], recipe.group_size,
                                  recipe.code)
        k_of = {"qkv_proj": self.hidden, "o_proj": self.heads * self.head_dim, "gate_up_proj": self.hidden,
                "down_proj": self.inter}
        # vLLM module -> its own weight group where it differs from gs (the checkpoint stores those per linear)
        self.gs_for = {module: gs for module, requested in parse_group_sizes(recipe.group_size_for).items()
                       if (gs := pick_group_size([k_of[module]], requested, recipe.code)) != self.gs}
        self.linear_gs = {m: self.gs_for.get(module, self.gs) for m, module in VLLM_MODULE.items()}
        self.kb_o = pick_k_blocks(self.heads * self.head_dim, self.linear_gs["self_attn.o_proj"],
                                  recipe.row_parallel_blocks)
        self.kb_down = pick_k_blocks(self.inter, self.linear_gs["mlp.down_proj"], recipe.row_parallel_blocks)
        self.specs: dict[str, fmt.LayerSpec] = {}
        self.seconds: dict[str, float] = dict.fromkeys(WEIGHT_STAGES, 0.0)
        self.earlier_seconds = 0.0  # weight-stage time spent by the runs this one resumes
        self.transform_example: dict | None = None
        self.act_example: dict | None = None

    # ---------------------------------------------------------------- resumable block loop -------
    def quantize_weights(self) -> None:
        with torch.device(self.place.device):  # tensors the stages create land where the block computes
            self._quantize_weights()

    def _quantize_weights(self) -> None:
        state = os.path.join(self.work, "state")
        os.makedirs(state, exist_ok=True)
        self._check_recipe()
        layers = decoder_layers(self.model)
        progress = os.path.join(state, "progress.json")
        saved = json.load(open(progress)) if os.path.exists(progress) else {"next_block": 0}
        start = saved["next_block"]
        # the earlier runs' time on the weight stage, so a resumed run's report counts it (older state lacks it)
        self.earlier_seconds = sum(saved.get("seconds", {}).values())
        for stage, s in saved.get("seconds", {}).items():
            self.seconds[stage] += s
        for l in tqdm(range(start), desc="restore blocks", disable=not start):
            self._restore_block(l, os.path.join(state, f"block_{l:03d}"))
        if start:
            self.log(f"resuming at block {start}/{len(layers)} from {state}")
            inputs = torch.load(os.path.join(state, "hidden.pt"), weights_only=False, map_location=self.place.device)
        else:
            t0 = time.time()
            text = data.load_text(self.r.calib, "calib", self.r.text_column)
            ids = data.token_windows(self.tok, text, self.r.nsamples, self.r.seqlen, self.r.seed)
            inputs = capture_first_block_inputs(self.model, ids, self.r.batch_size)
            self.seconds["calibrate"] += time.time() - t0
        for l in tqdm(range(start, len(layers)), desc="quantize blocks", initial=start, total=len(layers)):
            with self.place.block(layers[l]):
                inputs = self._quantize_block(l, layers[l], inputs)
            self._save_block(l, os.path.join(state, f"block_{l:03d}"))
            _atomic_torch_save(inputs, os.path.join(state, "hidden.pt"))
            _atomic_json(progress, {"next_block": l + 1, "seconds": {k: self.seconds[k] for k in WEIGHT_STAGES}})

    def _check_recipe(self) -> None:
        """Refuse to resume a weight stage made with other weight settings; settings read after it (AFTER_WEIGHTS:
        bit allocation, clip search) may change, and the saved recipe then takes the new values."""
        path = os.path.join(self.work, "recipe.json")
        mine = json.loads(json.dumps(self.r.to_dict()))
        if os.path.exists(path):
            # a key the saved recipe lacks is newer than the run, which behaved as its default then
            saved = {**json.loads(json.dumps(Recipe().to_dict())), **BEHAVED_BEFORE, **json.load(open(path))}
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            weights = {k: d for k, d in diff.items() if k not in AFTER_WEIGHTS}
            if weights:
                raise SystemExit(f"{self.work}: an interrupted run with different weight settings is there {weights}; "
                                 f"delete it or pass --restart")
            if diff:
                self.log(f"reusing the weight stage in {self.work}; changed after it: {diff}")
        _atomic_json(path, mine)

    # ---------------------------------------------------------------- one block ------------------
    def _quantize_block(self, l: int, layer, inputs: BlockInputs) -> BlockInputs:
        r = self.r
        t0 = time.time()
        lin = {name: layer.get_submodule(name) for name in (*ATTN, "self_attn.o_proj", *MLP_IN, "mlp.down_proj")}
        if r.fold_norms:
            fold_norm_into([lin[n] for n in ATTN], layer.input_layernorm)
            fold_norm_into([lin[n] for n in MLP_IN], layer.post_attention_layernorm)
        gen = torch.Generator().manual_seed(r.seed * 1000 + l)
        o_online = r.o_proj_rotation == "full"
        if not o_online:  # o_proj's head-local factor moves into v_proj's output (exact), nothing runs online
            b_o = self._factors(lin["self_attn.o_proj"].weight, self.heads, self.head_dim, 1, gen,
                                self.linear_gs["self_attn.o_proj"], learn_left=False)[1]
            if b_o is not None:
                fold_head_rotation(lin["self_attn.v_proj"], lin["self_attn.o_proj"], b_o, self.head_dim)
        sites = [(ATTN, self.hidden, 1), (("self_attn.o_proj",), self.heads * self.head_dim, self.kb_o),
                 (MLP_IN, self.hidden, 1), (("mlp.down_proj",), self.inter, self.kb_down)]
        if r.rotation_sharing == "linear":  # every linear its own transform (the fused vLLM module runs per shard)
            sites = [((m,), k, blocks) for members, k, blocks in sites for m in members]
        rots = {}
        originals = {m: lin[m].weight.data.float().clone() for m in lin}
        for members, k, blocks in sites:
            if members[0] == "self_attn.o_proj" and not o_online:
                rots[members] = (None, None)
                continue
            w = torch.cat([lin[m].weight.data for m in members])
            n1, n2 = (reference_factors(k, w.shape[0], blocks) if r.factor_rule == "reference"
                      else balanced_factors(k, blocks))
            rots[members] = self._factors(w, n1, n2, blocks, gen, self.linear_gs[members[0]],
                                          example=(l == 1 and members == MLP_IN),
                                          site_inputs=self._site_inputs(layer, lin[members[0]], inputs))
        if l == 1 and rots.get(MLP_IN, (None,))[0] is not None:  # report: channel ranges of one input before/after
            x = capture_inputs(layer, lin[MLP_IN[0]], inputs, max_tokens=2048)
            self.act_example = {"before": x.abs().amax(0).cpu(),
                                "after": kron_rotate(x, *rots[MLP_IN]).abs().amax(0).cpu()}
        for members, _, _ in sites:
            c, b = rots[members]
            for m in members:
                w = lin[m].weight.data.float()
                if c is not None:
                    w = fold_weight(w, c, b)
                replace_linear(layer, m, RotatedLinear(w, lin[m].bias, c, b))
        self.seconds["rotate"] += time.time() - t0

        t0 = time.time()
        for members, k, blocks in sites:
            c, b = rots[members]
            gs = self.linear_gs[members[0]]
            ab = pick_act_blocks(k, None if c is None else c.shape[0], blocks, gs, r.act_group_size)
            h = cross = None
            if (r.weight_method == "e2m-atq" and r.weight_target == "act" and r.act_bits < 16
                    and calibration_tokens(inputs) >= ACT_TARGET_TOKENS_PER_INPUT * k):
                h, cross = quantized_input_grams(layer, layer.get_submodule(members[0]), inputs,
                                                 int(round(r.act_bits)), ab or blocks)
            elif r.weight_method == "e2m-atq":
                h = input_gram(layer, layer.get_submodule(members[0]), inputs)
            for m in members:
                rl = layer.get_submodule(m)
                qw, la, lb = self._quantize_linear(originals[m], rl.weight.data, c, b, h, gs,
                                                   self._site_inputs(layer, layer.get_submodule(members[0]), inputs),
                                                   cross)
                prefix = f"model.layers.{l}.{m}"
                spec = fmt.LayerSpec(act_bits=16, act_clip=r.default_clip, k_blocks=blocks, act_blocks=ab,
                                     rotation=None if c is None else (c.shape[0], b.shape[0]),
                                     lowrank_rank=0 if la is None else la.shape[1],
                                     group_size=0 if gs == self.gs else gs)
                self.specs[prefix] = spec
                replace_linear(layer, m, self._quantized_linear(qw, c, b, spec.act_ranges,
                                                                rl.bias.data if rl.bias is not None else None, la, lb))
        out = run_block(layer, inputs)
        self.seconds["weights"] += time.time() - t0
        return out

    def _quantized_linear(self, qw: QuantWeight, left, right, act_ranges: int, bias, lowrank_a, lowrank_b):
        """The module that stands for a quantized linear from here on (16-bit activations until allocation)."""
        return SimTwlaLinear(qw, left, right, 16, self.r.default_clip, act_ranges, bias, lowrank_a, lowrank_b)

    @staticmethod
    def _site_inputs(layer, module, inputs: BlockInputs):
        """Lazily captured calibration rows of `module`'s input (before any transform)."""
        cache: list[torch.Tensor] = []

        def get() -> torch.Tensor:
            if not cache:
                cache.append(capture_inputs(layer, module, inputs, max_tokens=SITE_INPUT_TOKENS))
            return cache[0]

        return get

    def _factors(self, w, n1, n2, blocks, gen, group_size, learn_left=True, example=False, site_inputs=None):
        """(left or None, right) of one input site's Kronecker transform, from the stacked weights w that read
        it (quantized in groups of `group_size`): learned by the recipe's method, random orthogonal, or none. The
        left factor is block-diagonal with `blocks` blocks (shard-local under tensor parallelism)."""
        r = self.r
        if r.rotation == "none":
            return None, None
        if r.rotation == "random":
            c = (block_diagonal_orthogonal(n1, blocks, gen) if blocks > 1 else random_orthogonal(n1, gen)) \
                if learn_left else None
            return c, random_orthogonal(n2, gen)
        c, b, hist = transform_learner(r.rotation)(w, n1, n2, group_size, blocks, learn_left, r, site_inputs)
        if example:
            wr = w.float().reshape(-1, n1, n2)
            wr = (wr if c is None else torch.matmul(c, wr)) @ b
            self.transform_example = {"before": w.float().flatten().cpu(), "after": wr.flatten().cpu(), "loss": hist}
        return c, b

    def _quantize_linear(self, w: torch.Tensor, w_folded: torch.Tensor, left: torch.Tensor | None,
                         right: torch.Tensor | None, h: torch.Tensor | None, group_size: int, site_inputs=None,
                         cross: torch.Tensor | None = None):
        """(QuantWeight of the transformed weights, lowrank_a, lowrank_b) of one linear: the weight stage alone,
        or a low-rank fit that quantizes the residual W - A B through the same transform and weight stage. With
        `cross` (weight target "act") h is X̃ᵀX̃ and GPTQ fits `act_aware_target` of the transformed weights."""
        def target(w: torch.Tensor) -> torch.Tensor:
            return w if cross is None else act_aware_target(w, h, cross)

        if self.r.lowrank == "none":
            return self._quantize_weight(target(w_folded), h, group_size), None, None

        def quantize(residual: torch.Tensor) -> tuple[QuantWeight, torch.Tensor]:
            """The residual (original basis) quantized, and its dequantized value in the original basis."""
            folded = residual if left is None else fold_weight(residual, left, right)
            qw = self._quantize_weight(target(folded), h, group_size)
            deq = qw.dequantize()
            return qw, deq if left is None else unfold_weight(deq, left, right)

        return lowrank_fit(self.r.lowrank)(w, quantize, self.r.lowrank_rank, self.r, site_inputs)

    def _quantize_weight(self, w: torch.Tensor, h: torch.Tensor | None, group_size: int) -> QuantWeight:
        m, code = self.r.weight_method, fmt.CODES[self.r.code]
        if m == "rtn":
            return fit_rtn(w, code, group_size)
        if m == "atq":
            return fit_rtn(w, code, group_size, iters=15)
        if m == "e2m-atq":
            return gptq_quantize(w, h, code, group_size, stage1_iters=self.r.stage1_iters, stage2=True,
                                 percdamp=self.r.percdamp)
        raise ValueError(f"unknown weight_method {m!r}")

    # ---------------------------------------------------------------- block state on disk ---------
    def _block_prefixes(self, l: int) -> list[str]:
        return [f"model.layers.{l}.{m}" for m in (*ATTN, "self_attn.o_proj", *MLP_IN, "mlp.down_proj")]

    def _save_block(self, l: int, path: str) -> None:
        layer = decoder_layers(self.model)[l]
        tensors = {}
        for name, p in layer.state_dict().items():
            tensors[name] = p.detach().cpu().contiguous().clone()
        save_file(tensors, path + ".safetensors.tmp")
        os.replace(path + ".safetensors.tmp", path + ".safetensors")
        _atomic_json(path + ".json", {p: self.specs[p].to_dict() for p in self._block_prefixes(l)})

    def _restore_block(self, l: int, path: str) -> None:
        layer = decoder_layers(self.model)[l]
        tensors = load_file(path + ".safetensors")
        specs = json.load(open(path + ".json"))
        for prefix, d in specs.items():
            spec = fmt.parse_layer_spec(d, path, fmt.LayerSpec())
            self.specs[prefix] = spec
            m = prefix.split(".", 3)[3]
            g = lambda s: tensors.get(f"{m}.{s}")  # noqa: E731
            qw = QuantWeight(g("codes").to(torch.int32), fmt.CODES[self.r.code], g("row_scale"), g("group_scale"),
                             g("group_offset"))
            replace_linear(layer, m, SimTwlaLinear(qw, g("left"), g("right"), spec.act_bits, spec.act_clip,
                                                   spec.act_ranges, g("bias"), g("lowrank_a"), g("lowrank_b")))
        rest = {k: v for k, v in tensors.items() if not any(k.startswith(p.split(".", 3)[3] + ".")
                                                              for p in specs)}
        layer.load_state_dict(rest, strict=False)
        layer.to(self.place.home())

    # ---------------------------------------------------------------- after all blocks ------------
    def sim_layers(self) -> dict[str, SimTwlaLinear]:
        return {name: mod for name, mod in self.model.named_modules() if isinstance(mod, SimTwlaLinear)}

    def allocate_and_clip(self) -> list[int]:
        bits = self.allocate()
        if self.r.clip_search:
            self.search_clips()
        return bits

    def allocate(self) -> list[int]:
        """Activation bits per block (ILA-AMP on held-out text, or uniform) applied to the model."""
        r = self.r
        n_layers = len(decoder_layers(self.model))
        t0 = time.time()
        if r.allocation == "ila-amp":
            heldout = data.load_text(r.calib, "heldout", r.text_column)
            ids = data.token_windows(self.tok, heldout, max(1, r.amp_tokens // r.amp_seqlen), r.amp_seqlen, r.seed + 1)
            with torch.device(self.place.device), self.place.streaming(decoder_layers(self.model)):
                table = allocate.measure_sensitivity(self.model, ids, r.bit_set, set_block_bits=self.set_block_bits,
                                                     stash=self.place.home())
            bits = allocate.allocate_bits(table, r.bit_set, r.act_bits, r.amp_beta)
        else:
            bits = [int(r.act_bits)] * n_layers
        for l, b in enumerate(bits):
            self.set_block_bits(l, b)
        self._sync_specs()
        self.seconds["allocate"] = time.time() - t0
        return bits

    def tune(self, dense_path: str) -> list[tuple[float, float]]:
        """Block-wise scale tuning (tune.py) against the dense model at `dense_path` (read again: the quantizer's
        copy became the quantized model), on the calibration windows; (block error before, after) per block."""
        from .models import load_model
        from .tune import tune_block

        r = self.r
        t0 = time.time()
        dense_layers = list(decoder_layers(load_model(dense_path)[0]))  # float32, CPU memory, one block at a time
        text = data.load_text(r.calib, "calib", r.text_column)
        ids = data.token_windows(self.tok, text, r.nsamples, r.seqlen, r.seed)
        layers = decoder_layers(self.model)
        errors = []
        with torch.device(self.place.device):
            x_quant = capture_first_block_inputs(self.model, ids, r.batch_size)  # the embeddings are not quantized
            x_dense = x_quant
            for l in tqdm(range(len(layers)), desc="tune blocks"):
                dense, dense_layers[l] = dense_layers[l].to(self.place.device), None
                y_dense = run_block(dense, x_dense)
                del dense
                with self.place.block(layers[l]):
                    before, after, x_quant = tune_block(layers[l], x_quant, y_dense, r.tune_epochs, r.tune_lr,
                                                        r.seed * 1000 + l)
                errors.append((before, after))
                x_dense = y_dense
        self.seconds["tune"] = time.time() - t0
        return errors

    def search_clips(self) -> None:
        t0 = time.time()
        ids = clip_windows(self.tok, self.r)
        sims = self.sim_layers()
        # TF32 on CUDA: it rounds an output by ~1e-3 of its size, small against the 2-8-bit activation error compared
        with torch.device(self.place.device), self.place.streaming(decoder_layers(self.model)), \
                cuda_matmul_precision("tf32"):
            chosen = clip.search_clips(self.model, ids, self._sites(), self.r.batch_size, self.r.clip_grid(),
                                       self.r.clip_objective)
        for prefix, c in chosen.items():
            sims[prefix].act_clip = c
        self._sync_specs()
        self.seconds["clip"] = time.time() - t0

    def _sync_specs(self) -> None:
        for prefix, mod in self.sim_layers().items():
            self.specs[prefix] = dataclasses.replace(self.specs[prefix], act_bits=mod.act_bits,
                                                     act_clip=round(float(mod.act_clip), 4))

    def _sites(self) -> list[list[str]]:
        return input_sites(len(decoder_layers(self.model)))

    def set_block_bits(self, l: int, bits: int) -> None:
        for prefix in self._block_prefixes(l):
            self.model.get_submodule(prefix).act_bits = bits

    def export(self, out_dir: str, src_config: dict, dtype: torch.dtype, extra_files=None) -> str:
        tensors: dict[str, torch.Tensor] = {}
        sims = self.sim_layers()
        for name, p in self.model.state_dict().items():
            owner = name.rpartition(".")[0]
            if owner in sims or (name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False)):
                continue
            tensors[name] = p.to(dtype) if p.is_floating_point() else p
        for prefix, mod in sims.items():
            tensors.update(mod.tensors(prefix))
            if mod.bias is not None:
                tensors[f"{prefix}.bias"] = mod.bias.to(dtype)
        default = fmt.LayerSpec(act_bits=int(round(self.r.act_bits)), act_clip=self.r.default_clip)
        qcfg = fmt.CheckpointConfig(group_size=self.gs, default=default, layers=dict(self.specs),
                                    weight_code=self.r.code, recipe={"method": "twla", **self.r.to_dict()})
        return write_checkpoint(out_dir, src_config, tensors, qcfg, tokenizer=self.tok, extra_files=extra_files)


def _atomic_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _atomic_torch_save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def clear_work_dir(work_dir: str) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
