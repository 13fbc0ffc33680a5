"""Megatron-style tensor parallelism of the decoder: one rank's share of the weights, and the two all-reduces.

A transform of a meta-device `Qwen2VL` (the model files know nothing of it), in the shape vLLM's
`QKVParallelLinear` / `RowParallelLinear` and gpt-fast's `tp.py` give Llama: per decoder layer,
  - q_proj, k_proj, v_proj column-parallel with their biases: whole heads per rank; when the world size exceeds
    the KV heads, each KV head is replicated on the ranks whose query heads use it (vLLM's rule);
  - o_proj row-parallel, its partial outputs summed by an all-reduce (o_proj has no bias to add twice);
  - gate_proj, up_proj column-parallel, down_proj row-parallel, then an all-reduce.
The embedding, the output projection and the vision tower stay whole on every rank: for the 7B and 72B the first
two are 7% and 2% of the weights (a vocab-parallel output would save that share for an all-gather of the logits
every step; on small models on CPU it would be faster, see docs/serving.md), and the replicated parts give every
rank the same hidden states, so every rank chooses the same tokens without sending any.
The rank's config (model.config.text) counts the rank's heads, so a KV cache built from it holds only those.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import TextConfig, VisionConfig
from ..model import Qwen2VL
from ..weights import TensorSlice


@dataclass(frozen=True, slots=True)
class RankTextConfig(TextConfig):
    """A decoder config whose head counts are one rank's; head_dim stays the model's."""

    full_head_dim: int = 0

    @property
    def head_dim(self) -> int:
        return self.full_head_dim


@dataclass(frozen=True, slots=True)
class Share:
    """What rank `rank` of `world` holds: query heads q0..q0+q, KV heads kv0..kv0+kv, MLP columns m0..m0+m."""

    rank: int
    world: int
    q0: int
    q: int
    kv0: int
    kv: int
    m0: int
    m: int


def works(cfg: TextConfig, world: int) -> bool:
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    kv_ok = kv % world == 0 if world <= kv else world % kv == 0
    return heads % world == 0 and kv_ok and cfg.intermediate_size % world == 0


def check_world_size(cfg: TextConfig, world: int) -> None:
    """Refuse a world size that cannot split the heads and the MLP evenly, naming the sizes that can."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, not {world}")
    if not works(cfg, world):
        sizes = [n for n in range(1, cfg.num_attention_heads + 1) if works(cfg, n)]
        raise ValueError(
            f"tensor_parallel_size={world} does not split this model: {cfg.num_attention_heads} query heads, "
            f"{cfg.num_key_value_heads} KV heads (replicated only when the size is a multiple of them) and "
            f"intermediate_size {cfg.intermediate_size} must divide evenly; sizes that work: {sizes}"
        )


def share(cfg: TextConfig, rank: int, world: int) -> Share:
    check_world_size(cfg, world)
    q = cfg.num_attention_heads // world
    if world <= cfg.num_key_value_heads:
        kv, kv0 = cfg.num_key_value_heads // world, rank * cfg.num_key_value_heads // world
    else:  # one KV head, the one this rank's query heads attend with (they are all in its group)
        kv, kv0 = 1, rank * q // cfg.num_kv_groups
    m = cfg.intermediate_size // world
    return Share(rank, world, rank * q, q, kv0, kv, rank * m, m)


def shard_decoder(
    model: Qwen2VL, rank: int, world: int, group: dist.ProcessGroup | None = None
) -> dict[str, TensorSlice]:
    """Cut a meta-device model down to rank `rank`'s share of the decoder and attach the all-reduces over `group`.

    Returns the slice of its checkpoint tensor each sharded parameter reads (for weights.load_weights).
    """
    cfg = model.config.text
    s = share(cfg, rank, world)
    hd = cfg.head_dim
    rows = {  # column-parallel: a range of output rows (weight dim 0, and the bias)
        "self_attn.q_proj": (s.q0 * hd, (s.q0 + s.q) * hd, cfg.num_attention_heads * hd),
        "self_attn.k_proj": (s.kv0 * hd, (s.kv0 + s.kv) * hd, cfg.num_key_value_heads * hd),
        "self_attn.v_proj": (s.kv0 * hd, (s.kv0 + s.kv) * hd, cfg.num_key_value_heads * hd),
        "mlp.gate_proj": (s.m0, s.m0 + s.m, cfg.intermediate_size),
        "mlp.up_proj": (s.m0, s.m0 + s.m, cfg.intermediate_size),
    }
    cols = {  # row-parallel: a range of input columns (weight dim 1)
        "self_attn.o_proj": (s.q0 * hd, (s.q0 + s.q) * hd, cfg.num_attention_heads * hd),
        "mlp.down_proj": (s.m0, s.m0 + s.m, cfg.intermediate_size),
    }
    slices: dict[str, TensorSlice] = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        for name, (start, stop, full) in rows.items():
            old = layer.get_submodule(name)
            _replace(layer, name, nn.Linear(old.in_features, stop - start, bias=old.bias is not None, device="meta"))
            slices[prefix + name + ".weight"] = TensorSlice(0, start, stop, full)
            if old.bias is not None:
                slices[prefix + name + ".bias"] = TensorSlice(0, start, stop, full)
        for name, (start, stop, full) in cols.items():
            old = layer.get_submodule(name)
            assert old.bias is None, f"{name} has a bias: a row-parallel layer would add it once per rank"
            linear = nn.Linear(stop - start, old.out_features, bias=False, device="meta")
            linear.reduce_rows = _max_over(group)  # type: ignore[assignment]  (a row's range spans the ranks)
            _replace(layer, name, linear)
            slices[prefix + name + ".weight"] = TensorSlice(1, start, stop, full)
        layer.self_attn.num_heads, layer.self_attn.num_kv_heads = s.q, s.kv
        # each rank's o_proj / down_proj output is a partial sum over its heads / MLP columns: add them up.
        # Hooks on the attention and MLP modules, not on the Linear layers, so that CPU kernels replacing the
        # Linear layers keep them.
        for module in (layer.self_attn, layer.mlp):
            module.register_forward_hook(_all_reduce_hook(group))
    rank_cfg = RankTextConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TextConfig)}, full_head_dim=hd
    )
    rank_cfg = dataclasses.replace(rank_cfg, num_attention_heads=s.q, num_key_value_heads=s.kv)
    model.config = dataclasses.replace(model.config, text=rank_cfg)
    model.model.cfg = rank_cfg
    return slices


def check_vision_world_size(cfg: VisionConfig, world: int) -> None:
    if cfg.num_heads % world or cfg.mlp_dim % world:
        sizes = [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0 and cfg.mlp_dim % n == 0]
        raise ValueError(
            f"tensor_parallel_size={world} does not split the vision tower: {cfg.num_heads} heads and MLP width "
            f"{cfg.mlp_dim} must divide evenly; sizes that work: {sizes} (or leave the vision tower whole)"
        )


def shard_vision(
    model: Qwen2VL, rank: int, world: int, group: dist.ProcessGroup | None = None
) -> dict[str, TensorSlice | tuple[TensorSlice, ...] | None]:
    """Cut a meta-device model's vision blocks down to rank `rank`'s heads and MLP columns (the patch embedding
    and the merger stay whole): per block, qkv column-parallel (the rank's heads of q, of k and of v: three row
    ranges of the fused weight), proj row-parallel, fc1 column-parallel, fc2 row-parallel, each row-parallel
    output summed by an all-reduce. Their biases are added once, by rank 0 (the others hold zeros). The
    all-reduces hang on the two Linear layers themselves, since the piecewise encode (encode_pieces) calls them
    directly in row ranges; the CPU kernels keep a replaced layer's hooks. Returns the slices to read (a tuple:
    parts read and concatenated; None: not read, zeros)."""
    cfg = model.config.vision
    check_vision_world_size(cfg, world)
    heads, hd, e = cfg.num_heads // world, cfg.head_dim, cfg.embed_dim
    lo, hi = rank * heads * hd, (rank + 1) * heads * hd
    m = cfg.mlp_dim // world
    m0 = rank * m
    slices: dict[str, TensorSlice | tuple[TensorSlice, ...] | None] = {}
    for i, block in enumerate(model.visual.blocks):
        prefix = f"visual.blocks.{i}."
        qkv = tuple(TensorSlice(0, j * e + lo, j * e + hi, 3 * e) for j in range(3))  # q, k, v rows of my heads
        _replace(block, "attn.qkv", nn.Linear(e, 3 * (hi - lo), device="meta"))
        slices[prefix + "attn.qkv.weight"] = slices[prefix + "attn.qkv.bias"] = qkv
        block.attn.num_heads = heads
        _replace(block, "mlp.fc1", nn.Linear(e, m, device="meta"))
        slices[prefix + "mlp.fc1.weight"] = slices[prefix + "mlp.fc1.bias"] = TensorSlice(0, m0, m0 + m, cfg.mlp_dim)
        for name, start, stop, full in (("attn.proj", lo, hi, e), ("mlp.fc2", m0, m0 + m, cfg.mlp_dim)):
            linear = nn.Linear(stop - start, e, device="meta")
            linear.register_forward_hook(_all_reduce_hook(group))
            _replace(block, name, linear)
            slices[prefix + name + ".weight"] = TensorSlice(1, start, stop, full)
            if rank:
                slices[prefix + name + ".bias"] = None
    model.visual.split_over_ranks = True  # type: ignore[assignment]  (the engine hands its encodes to the ranks)
    return slices


def _replace(parent: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, child = path.rpartition(".")
    setattr(parent.get_submodule(owner), child, module)


def _max_over(group):
    """In place: the largest value over the ranks (--quantize int8 scales a row by its largest |w| over all its
    inputs, which a row-parallel layer holds on different ranks)."""

    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

    return reduce


def _all_reduce_hook(group):
    def hook(module, inputs, output: torch.Tensor) -> None:
        dist.all_reduce(output, group=group)  # in place: the sum over ranks is the layer's output

    return hook
