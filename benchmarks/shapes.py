"""Parameter shape tables of reference models, for byte accounting without instantiating them.

A table is a list of :class:`ParamSpec` (name, shape, kind), one per trainable
tensor (a tied output head is not listed twice). Kinds say who updates the
tensor in a Dion run (the split :func:`dion_lp.param_groups` makes):

- ``"dion-matrix"``: hidden 2-D weights (attention and MLP projections);
- ``"embedding"``, ``"head"``: 2-D, but updated element-wise (AdamW / Lion);
- ``"vector"``: biases and norm weights, element-wise.

Models (shapes as published; linear weights as ``(out_features, in_features)``):

- ``gpt2-small``: 12 layers, d 768, 12 heads, 4x GELU MLP, vocab 50257, 1024
  learned positions, biases, LayerNorms, head tied to the token embedding:
  124,439,808 parameters. Names and layout are those of
  :class:`benchmarks.model.GPT` so a real model can be built from
  :data:`GPT2_SMALL`.
- ``llama-7b``: Llama 2 7B, d 4096, 32 layers, 32 heads, SwiGLU ffn 11008,
  vocab 32000, RMSNorm, untied head: 6,738,415,616.
- ``llama-70b``: Llama 2 70B, d 8192, 80 layers, 64 heads, GQA 8 kv heads x
  128, ffn 28672, vocab 32000: 68,976,648,192.
- ``llama-405b``: Llama 3.1 405B, d 16384, 126 layers, 128 heads, 8 kv heads x
  128, ffn 53248, vocab 128256: 405,853,388,800.

    python -m benchmarks.shapes            # parameter counts by kind
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .model import GPTConfig

__all__ = [
    "GPT2_SMALL",
    "KINDS",
    "KNOWN_TOTALS",
    "MODELS",
    "ParamSpec",
    "count_by_kind",
    "from_model",
    "gpt_shapes",
    "llama_shapes",
    "main",
    "param_count",
    "shapes",
]

KINDS = ("dion-matrix", "embedding", "head", "vector")

GPT2_SMALL = GPTConfig(
    vocab_size=50257, seq_len=1024, d_model=768, n_layer=12, n_head=12, tied=True, bias=True
)

# Published parameter counts the tables must reproduce exactly.
KNOWN_TOTALS = {
    "gpt2-small": 124_439_808,
    "llama-7b": 6_738_415_616,
    "llama-70b": 68_976_648_192,
    "llama-405b": 405_853_388_800,
}


@dataclass(frozen=True)
class ParamSpec:
    """One trainable tensor: ``name``, ``shape`` and ``kind`` (one of :data:`KINDS`)."""

    name: str
    shape: tuple[int, ...]
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r}; expected one of {KINDS}")
        if self.kind != "vector" and len(self.shape) != 2:
            raise ValueError(f"Invalid shape {self.shape} for a {self.kind}: expected 2-D")

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def gpt_shapes(cfg: GPTConfig) -> list[ParamSpec]:
    """The tensors of :class:`benchmarks.model.GPT` built from ``cfg``, in its parameter order."""
    d, specs = cfg.d_model, []
    specs.append(ParamSpec("wte.weight", (cfg.vocab_size, d), "embedding"))
    specs.append(ParamSpec("wpe.weight", (cfg.seq_len, d), "embedding"))

    def linear(name: str, out_features: int, in_features: int) -> None:
        specs.append(ParamSpec(f"{name}.weight", (out_features, in_features), "dion-matrix"))
        if cfg.bias:
            specs.append(ParamSpec(f"{name}.bias", (out_features,), "vector"))

    def norm(name: str) -> None:
        specs.append(ParamSpec(f"{name}.weight", (d,), "vector"))
        specs.append(ParamSpec(f"{name}.bias", (d,), "vector"))

    for i in range(cfg.n_layer):
        block = f"blocks.{i}"
        norm(f"{block}.ln_1")
        linear(f"{block}.attn.qkv", 3 * d, d)
        linear(f"{block}.attn.proj", d, d)
        norm(f"{block}.ln_2")
        linear(f"{block}.mlp.fc", 4 * d, d)
        linear(f"{block}.mlp.proj", d, 4 * d)
    norm("ln_f")
    if not cfg.tied:
        specs.append(ParamSpec("lm_head.weight", (cfg.vocab_size, d), "head"))
    return specs


def llama_shapes(
    d_model: int,
    n_layers: int,
    ffn: int,
    vocab: int,
    n_heads: int,
    n_kv_heads: int | None = None,
) -> list[ParamSpec]:
    """A Llama-style decoder: separate q/k/v/o, SwiGLU (w1, w3: gate/up; w2: down), RMSNorm.

    Args:
        d_model: width.
        n_layers: decoder layers.
        ffn: SwiGLU hidden size.
        vocab: vocabulary size (embedding and untied output head).
        n_heads: query heads (head dim = d_model / n_heads).
        n_kv_heads: key/value heads (GQA); None: n_heads.
    """
    head_dim = d_model // n_heads
    kv = (n_kv_heads or n_heads) * head_dim
    specs = [ParamSpec("tok_embeddings.weight", (vocab, d_model), "embedding")]
    for i in range(n_layers):
        layer = f"layers.{i}"
        for name, shape in (
            ("attention.wq", (d_model, d_model)),
            ("attention.wk", (kv, d_model)),
            ("attention.wv", (kv, d_model)),
            ("attention.wo", (d_model, d_model)),
            ("feed_forward.w1", (ffn, d_model)),
            ("feed_forward.w2", (d_model, ffn)),
            ("feed_forward.w3", (ffn, d_model)),
        ):
            specs.append(ParamSpec(f"{layer}.{name}.weight", shape, "dion-matrix"))
        specs.append(ParamSpec(f"{layer}.attention_norm.weight", (d_model,), "vector"))
        specs.append(ParamSpec(f"{layer}.ffn_norm.weight", (d_model,), "vector"))
    specs.append(ParamSpec("norm.weight", (d_model,), "vector"))
    specs.append(ParamSpec("output.weight", (vocab, d_model), "head"))
    return specs


MODELS: dict[str, Callable[[], list[ParamSpec]]] = {
    "gpt2-small": lambda: gpt_shapes(GPT2_SMALL),
    "llama-7b": lambda: llama_shapes(4096, 32, 11008, 32000, n_heads=32),
    "llama-70b": lambda: llama_shapes(8192, 80, 28672, 32000, n_heads=64, n_kv_heads=8),
    "llama-405b": lambda: llama_shapes(16384, 126, 53248, 128256, n_heads=128, n_kv_heads=8),
}


def shapes(name: str) -> list[ParamSpec]:
    """The shape table of model ``name`` (a key of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"Invalid model: {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]()


def param_count(specs: list[ParamSpec]) -> int:
    """Total number of parameters."""
    return sum(s.numel for s in specs)


def count_by_kind(specs: list[ParamSpec]) -> dict[str, int]:
    """Parameters per kind (every kind of :data:`KINDS`, zeros included)."""
    counts = dict.fromkeys(KINDS, 0)
    for s in specs:
        counts[s.kind] += s.numel
    return counts


def from_model(model: nn.Module, **group_options: object) -> list[ParamSpec]:
    """The shape table of a real model, kinds from :func:`dion_lp.param_groups`.

    Works on meta-device models too (only shapes are read). A 2-D tensor of an
    element-wise group is an ``"embedding"`` if an ``nn.Embedding`` owns it, else
    a ``"head"``; the other element-wise tensors are ``"vector"``.

    Args:
        model: the model.
        **group_options: passed to :func:`dion_lp.param_groups` (e.g. ``head_names``).
    """
    from dion_lp import param_groups

    embedding_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    kind_of: dict[int, str] = {}
    for group in param_groups(model, **group_options):
        for p in group["params"]:
            if group["algorithm"] == "dion":
                kind_of[id(p)] = "dion-matrix"
            elif p.ndim == 2 and min(p.shape) > 1:
                kind_of[id(p)] = "embedding" if id(p) in embedding_ids else "head"
            else:
                kind_of[id(p)] = "vector"
    return [
        ParamSpec(name, tuple(p.shape), kind_of[id(p)])
        for name, p in model.named_parameters()
        if id(p) in kind_of
    ]


def main(argv: list[str] | None = None) -> None:
    """Print (and with ``--out`` write) each model's parameter count by kind."""
    from ._tables import Column, environment, format_table, write_results

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shapes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models")
    parser.add_argument("--out", type=Path, help="write shapes.csv / shapes.json here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        specs = shapes(name)
        rows.append(
            {
                "model": name,
                "tensors": len(specs),
                "params": param_count(specs),
                **{k.replace("-", "_"): v for k, v in count_by_kind(specs).items()},
                "known_total": KNOWN_TOTALS.get(name),
            }
        )
    columns = [Column("model", "model"), Column("tensors", "tensors", ",")]
    columns += [Column(k, k, ",") for k in ("params", "dion_matrix", "embedding", "head")]
    columns += [Column("vector", "vector", ","), Column("known_total", "published", ",")]
    print(format_table(rows, columns))
    if args.out:
        tables = {r["model"]: [vars(s) for s in shapes(r["model"])] for r in rows}
        write_results(args.out, "shapes", rows, {"environment": environment(), "tables": tables})


if __name__ == "__main__":
    main()
