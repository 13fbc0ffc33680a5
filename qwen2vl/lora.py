"""LoRA as a transform of a loaded model, and adapters in PEFT's on-disk format.

`apply_lora` replaces the targeted nn.Linear modules by `LoRALinear` (the frozen layer plus a low-rank update), as
PEFT's `LoraModel` does; the forward is PEFT's `lora.Linear.forward` term for term:
base(x) + lora_B(lora_A(dropout(x))) * scaling, with scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
`lora_B` starts at zero (PEFT's `init_lora_weights=True`), so a new adapter leaves the logits unchanged.

On disk an adapter is what PEFT's `save_pretrained` writes: adapter_config.json and adapter_model.safetensors, keys
`base_model.model.<transformers module path>.lora_A.weight` under transformers >= 4.52 module paths
(`model.language_model.layers.*`, `model.visual.*`, `lm_head`); PEFT files from older transformers
(`model.layers.*`, `visual.*`) load too. Adapter features we do not implement (DoRA, biases, per-module ranks,
modules_to_save, ...) are refused by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .model.adapters import adapter_rows
from .weights import PREFIX_RENAMES, our_name

# the language model's linear layers (LLaMA-Factory's `lora_target: all` for Qwen2-VL's decoder)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the vision blocks' linear layers, targeted with `vision=True` (the patch embedding, a Conv3d, never is)
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed, or uses a PEFT feature we do not implement."""


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TEXT_TARGETS  # last components of module names, as PEFT's list form
    vision: bool = False  # also adapt the vision blocks' linear layers (VISION_TARGETS)
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module name")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (PEFT `lora.Linear`, one adapter)."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        # PEFT's default init: A Kaiming-uniform (a=sqrt(5), nn.Linear's own), B zero -> the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # code that reads a layer's weight (dtype, device) keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in: W + scaling * B @ A (PEFT `merge_and_unload`)."""
        base = self.base_layer
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        with torch.no_grad():
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Our module names of the nn.Linear layers `config` targets."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        last = name.rsplit(".", 1)[-1]
        if name.startswith("visual."):
            if config.vision and name.startswith("visual.blocks.") and last in VISION_TARGETS:
                names.append(name)
        elif last in config.target_modules:
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer of the model is named by the LoRA targets {list(config.target_modules)}")
    return names


def apply_lora(
    model: nn.Module, config: LoRAConfig, names: list[str] | None = None, seed: int | None = None
) -> list[str]:
    """Wrap the targeted (or the given) linear layers in LoRALinear, in place; freezes every other weight.
    Returns the wrapped module names."""
    names = target_names(model, config) if names is None else names
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            layer = getattr(owner, child)
            if not isinstance(layer, nn.Linear):
                raise AdapterError(f"LoRA on {name}: it is a {type(layer).__name__}, not a linear layer")
            setattr(owner, child, LoRALinear(layer, config.r, config.scaling, config.dropout))
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    model.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_A.weight.requires_grad_(True)
        module.lora_B.weight.requires_grad_(True)
    model.lora_config = config
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain nn.Linear back."""
    for name, module in lora_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    model.__dict__.pop("lora_config", None)


# -- PEFT's file format ------------------------------------------------------------------------------------------
def peft_module_path(name: str) -> str:
    """Our module name -> the transformers >= 4.52 module path PEFT records (inverse of weights.PREFIX_RENAMES)."""
    for theirs, ours in PREFIX_RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in lora_modules(model).items():
        key = PEFT_PREFIX + peft_module_path(name)
        state[f"{key}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
        state[f"{key}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    return state


def peft_config(config: LoRAConfig, base_model: str | None = None) -> dict:
    """adapter_config.json: the fields PEFT's LoraConfig reads, with the values of what we implement."""
    targets = list(config.target_modules)
    if config.vision:  # a regex (PEFT full-matches a string): the vision names alone would also hit patch_embed.proj
        text = "|".join(config.target_modules)
        vision = "|".join(VISION_TARGETS)
        targets = rf".*\.layers\.\d+\.(self_attn|mlp)\.({text})|.*visual\.blocks\.\d+\.(attn|mlp)\.({vision})"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "lora_bias": False,
        "revision": None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    from safetensors.torch import save_file

    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None or not lora_modules(model):
        raise AdapterError("the model carries no LoRA adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_model), indent=2))
    save_file(adapter_state_dict(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return directory


# adapter_config.json fields whose non-default values we cannot honour, with the default that we do implement
_UNSUPPORTED = {
    "use_dora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{directory}: not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if value != default and not (default is None and value in ({}, [])) and not (default == {} and value is None):
            raise AdapterError(f"{path}: {key}={value!r} is not supported (only {default!r})")
    targets = raw.get("target_modules")
    targets = tuple(targets) if isinstance(targets, list) else (str(targets),)
    return LoRAConfig(
        r=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0)),
        target_modules=targets,
        vision=False,
        rslora=bool(raw.get("use_rslora", False)),
    )


def read_adapter(directory: str | Path) -> tuple[LoRAConfig, dict[str, dict[str, torch.Tensor]]]:
    """The adapter in `directory` (PEFT's format): its config and {our module name: {"lora_A": A, "lora_B": B}}."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.exists():
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(path).items():
        stem = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else None
        part = next((p for p in ("lora_A", "lora_B") if stem and stem.endswith(f".{p}.weight")), None)
        if part is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<module>.lora_A/B.weight)")
        pairs.setdefault(our_name(stem[: -len(f".{part}.weight")]), {})[part] = t
    for name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {name} has {sorted(pair)} but needs lora_A and lora_B")
    if not pairs:
        raise AdapterError(f"{path}: no LoRA weights")
    return config, pairs


def load_adapter(model: nn.Module, directory: str | Path, slices: dict | None = None) -> list[str]:
    """Apply the adapter in `directory` (PEFT's format) to `model`, in place; returns the adapted module names.

    Which modules carry LoRA is read from the weights' keys (not guessed from target_modules); each must be a
    linear layer of the model, and every key must be used.
    `slices`: a tensor-parallel rank's share of the weights (qwen2vl.parallel): a layer split by output rows
    keeps those rows of lora_B, one split by inputs those columns of lora_A; each rank's LoRA output is then a
    partial sum that the layer's all-reduce adds up with the rest, since x A^T B^T is linear in x's parts."""
    config, pairs = _read_for(model, directory, slices)
    names = sorted(pairs)
    vision = any(n.startswith("visual.") for n in names)
    last = tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names if not n.startswith("visual.")))
    config = LoRAConfig(config.r, config.alpha, config.dropout, last or TEXT_TARGETS, vision, config.rslora)
    apply_lora(model, config, names, seed=0)  # seeded: the global generator is left as it was
    set_adapter_weights(model, pairs)
    return names


def _read_for(model: nn.Module, directory: str | Path, slices: dict | None):
    """The adapter in `directory`, cut to this rank's share (see load_adapter) and checked against `model`'s
    linear layers: (config, {module name: {"lora_A", "lora_B"}})."""
    config, pairs = read_adapter(directory)
    for name, pair in pairs.items():
        part = (slices or {}).get(name + ".weight")
        if part is None:
            continue
        parts = part if isinstance(part, tuple) else (part,)  # a fused qkv's share comes in three parts
        by_inputs = parts[0].dim == 1
        if by_inputs and name.startswith("visual."):
            raise AdapterError(
                f"{directory}: {name} carries LoRA, but with the vision tower split over the ranks its output is "
                "reduced inside the layer, before the LoRA term would be added; leave the vision tower whole"
            )
        which, dim = ("lora_A", 1) if by_inputs else ("lora_B", 0)
        pair[which] = torch.cat([pair[which].narrow(dim, p.start, p.stop - p.start) for p in parts], dim).contiguous()
    modules = dict(model.named_modules())
    for name, pair in pairs.items():
        layer = modules.get(name)
        if isinstance(layer, MultiLoRALinear):
            layer = layer.base_layer
        if not isinstance(layer, nn.Linear):
            raise AdapterError(f"{directory}: {name} is not a linear layer of this model")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape != (config.r, layer.in_features) or b.shape != (layer.out_features, config.r):
            raise AdapterError(
                f"{directory}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the "
                f"layer ({layer.in_features} -> {layer.out_features}) with r={config.r} needs "
                f"({config.r}, {layer.in_features}) and ({layer.out_features}, {config.r})"
            )
    return config, pairs


# -- several adapters side by side (the server's --lora-modules) -------------------------------------------------
class MultiLoRALinear(nn.Module):
    """A frozen linear layer with several LoRA adapters beside it, each batch row using the one adapters_for_rows
    names (vLLM's multi-LoRA batching, written as one loop over the adapters present). A row's result is
    LoRALinear's for that adapter: base(x) + lora_B(lora_A(x)) * scaling, the same operations on its rows."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A, self.lora_B = nn.ModuleList(), nn.ModuleList()
        self.adapters: list[int] = []  # adapter index of each (lora_A, lora_B) pair
        self.scalings: list[float] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add(self, adapter: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        w = self.base_layer.weight
        for tensor, holder in ((a, self.lora_A), (b, self.lora_B)):
            linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(tensor.to(w.dtype))
            holder.append(linear.requires_grad_(False))
        self.adapters.append(adapter)
        self.scalings.append(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        rows = adapter_rows()
        if rows is None:
            return result
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapters_for_rows names {len(rows)} rows, the input has {x.shape[0]}")
        for adapter, lora_a, lora_b, scaling in zip(self.adapters, self.lora_A, self.lora_B, self.scalings):
            picked = [i for i, a in enumerate(rows) if a == adapter]
            if len(picked) == x.shape[0]:
                result = result + lora_b(lora_a(x)) * scaling
            elif picked:
                index = torch.tensor(picked, device=x.device)
                result = result.index_add(0, index, lora_b(lora_a(x.index_select(0, index))) * scaling)
        return result


def load_adapters(model: nn.Module, directories: Sequence[str | Path], slices: dict | None = None) -> None:
    """Put the adapters in `directories` (PEFT's format) beside `model`'s linear layers, adapter i selected by
    adapters_for_rows; the base model answers rows that name none. Decoder adapters only: a vision encode is
    shared between requests (the server caches it by its pixels), so it cannot depend on the request's adapter."""
    for index, directory in enumerate(directories):
        config, pairs = _read_for(model, directory, slices)
        vision = sorted(n for n in pairs if n.startswith("visual."))
        if vision:
            raise AdapterError(
                f"{directory}: adapts the vision tower ({vision[0]}, ...), which adapters served side by side "
                "cannot (the server shares vision encodes between requests); serve it alone with --adapter"
            )
        for name, pair in pairs.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            layer = getattr(owner, child)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer)
                setattr(owner, child, layer)
            layer.add(index, pair["lora_A"], pair["lora_B"], config.scaling)


def set_adapter_weights(model: nn.Module, pairs: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy {module name: {"lora_A", "lora_B"}} into the model's LoRA layers (the same set of modules)."""
    wrapped = lora_modules(model)
    if set(wrapped) != set(pairs):
        raise AdapterError(
            f"the adapter covers {len(pairs)} modules, the model's LoRA layers {len(wrapped)}; "
            f"different: {sorted(set(wrapped) ^ set(pairs))[:5]}"
        )
    with torch.no_grad():
        for name, pair in pairs.items():
            w = wrapped[name].base_layer.weight
            wrapped[name].lora_A.weight.copy_(pair["lora_A"].to(w.dtype))
            wrapped[name].lora_B.weight.copy_(pair["lora_B"].to(w.dtype))
