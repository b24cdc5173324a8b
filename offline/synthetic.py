"""Synthetic TWLA checkpoints for tests: a tiny random Llama or Qwen2, RTN-ternarized, with random
orthogonal Kronecker rotations shared per input site and per-layer activation bits.

    twla-make-synthetic OUT_DIR [--arch llama|qwen2] [--group-size 64] [--seed 0] [--overwrite]
"""

from __future__ import annotations

import torch

from twla_vllm import format as fmt
from twla_vllm.reference import rotate_weight

from .errors import Parser, cli_errors
from .export import write_checkpoint
from .options import seed as seed_option
from .outdir import check_out_dir
from .layout import pick_act_blocks
from .rotate import balanced_factors, block_diagonal_orthogonal, random_orthogonal
from .weights import fit_rtn

# input sites of a decoder block: the linears that read the same activation share one rotation
SITES = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "o_in": ("self_attn.o_proj",),
         "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
         "down_in": ("mlp.down_proj",)}
ROW_PARALLEL_SITES = ("o_in", "down_in")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer():
    """Character-level tokenizer over printable ASCII (decodes exactly; no hub download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def tiny_config(arch: str, vocab_size: int, layers: int = 2) -> dict:
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, vocab_size=vocab_size, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  torch_dtype="float32")
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common}
    if arch == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                **common}
    raise ValueError(f"unknown arch {arch!r} (llama, qwen2)")


def make_synthetic_checkpoint(out_dir: str, arch: str = "llama", group_size: int = 64, seed: int = 0,
                              rotate: bool = True, tp_blocks: int = 2, layers: int = 2,
                              act_bits_cycle: tuple[int, ...] = (8, 4, 6), overwrite: bool = False,
                              code: str = "ternary", lowrank_rank: int = 0, per_linear_rotation: bool = False,
                              act_ranges: int = 1) -> str:
    """Write a random tiny model as a TWLA checkpoint. Layer l gets act_bits_cycle[l % len] (all its
    linears; o_proj one step of the cycle later, to exercise per-layer settings). `out_dir`: as for
    `write_checkpoint` (new or empty; a twla checkpoint only with `overwrite`). `code`: the weight code;
    `lowrank_rank` > 0 adds a random low-rank branch to every linear (the RTN fit is then of W - A·B);
    `per_linear_rotation` gives q/k/v and gate/up their own transforms (vLLM's fused module runs per shard);
    `act_ranges` > 1 splits every transform block's activations into that many ranges per token where the
    shapes allow (`layout.pick_act_blocks`; format key act_blocks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = char_tokenizer()
    cfg_dict = tiny_config(arch, len(tok), layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg_dict), dtype=torch.float32)
    with torch.no_grad():  # peaked logits: greedy decoding is then robust to fp rounding noise
        model.lm_head.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    state = model.state_dict()
    tensors = {k: v for k, v in state.items() if not _is_quantized_weight(k)}
    layer_specs: dict[str, fmt.LayerSpec] = {}
    for i in range(layers):
        for j, (site, members) in enumerate(SITES.items()):
            bits = act_bits_cycle[(i + (site == "o_in")) % len(act_bits_cycle)]
            k = state[f"model.layers.{i}.{members[0]}.weight"].shape[1]
            blocks = tp_blocks if site in ROW_PARALLEL_SITES else 1
            rot = _random_rotation(k, blocks, gen) if rotate else None
            for member in members:
                prefix = f"model.layers.{i}.{member}"
                if rotate and per_linear_rotation and member != members[0]:
                    rot = _random_rotation(k, blocks, gen)
                w = state[f"{prefix}.weight"]
                la = lb = None
                if lowrank_rank:
                    la = torch.randn(w.shape[0], lowrank_rank, generator=gen) * 0.05
                    lb = torch.randn(lowrank_rank, k, generator=gen) * 0.05
                    w = w - la.half().float() @ lb.half().float()
                if rot is not None:
                    w = rotate_weight(w, *rot)
                q = fit_rtn(w, fmt.CODES[code], group_size)
                tensors.update(fmt.linear_tensors(prefix, q.codes, q.code, q.row_scale, q.group_scale,
                                                  q.group_offset, *(rot or (None, None)), la, lb))
                ab = pick_act_blocks(k, None if rot is None else rot[0].shape[0], blocks, group_size,
                                     k // (blocks * act_ranges)) if act_ranges > 1 else 0
                layer_specs[prefix] = fmt.LayerSpec(
                    act_bits=bits, act_clip=0.95 if bits < 8 else 1.0,
                    rotation=None if rot is None else (rot[0].shape[0], rot[1].shape[0]),
                    k_blocks=blocks, act_blocks=ab, lowrank_rank=lowrank_rank)
    qcfg = fmt.CheckpointConfig(group_size=group_size, default=fmt.LayerSpec(act_bits=4, act_clip=1.0),
                                layers=layer_specs, weight_code=code,
                                recipe={"method": "synthetic-rtn", "seed": seed, "code": code})
    return write_checkpoint(out_dir, cfg_dict, tensors, qcfg, tokenizer=tok, overwrite=overwrite)


def _random_rotation(k: int, blocks: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n1, n2 = balanced_factors(k, blocks)
    left = block_diagonal_orthogonal(n1, blocks, gen) if blocks > 1 else random_orthogonal(n1, gen)
    return left, random_orthogonal(n2, gen)


def _is_quantized_weight(key: str) -> bool:
    return key.endswith(".weight") and any(key.endswith(f"{m}.weight") for ms in SITES.values() for m in ms)


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="twla-make-synthetic", description=__doc__)
    ap.add_argument("out_dir", help="checkpoint directory to write: new or empty (a twla checkpoint only "
                                    "with --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR if it is a checkpoint twla wrote and holds nothing else")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"], help="model architecture")
    # the tiny model's K are 128 and 256: a group must divide both
    ap.add_argument("--group-size", type=int, default=64, choices=[-1, 16, 32, 64, 128],
                    help="ternary weight group along K (-1 = per row)")
    ap.add_argument("--seed", type=seed_option, default=0, help="seed of the random weights and rotations")
    ap.add_argument("--no-rotation", action="store_true", help="store no input rotations")
    ap.add_argument("--code", default="ternary", choices=sorted(fmt.CODES), help="weight code")
    ap.add_argument("--lowrank-rank", type=int, default=0, help="rank of a random low-rank branch (0 = none)")
    args = ap.parse_args(argv)
    with cli_errors(ap.prog, args.debug):
        check_out_dir(args.out_dir, args.overwrite)  # before building the model
        path = make_synthetic_checkpoint(args.out_dir, args.arch, args.group_size, args.seed,
                                         not args.no_rotation, overwrite=args.overwrite, code=args.code,
                                         lowrank_rank=args.lowrank_rank)
    print(f"wrote synthetic TWLA checkpoint: {path}")


if __name__ == "__main__":
    main()
