"""Hugging Face transformers ``CLIPModel`` directories: export megaclip models to them, import them.

A directory written by ``megaclip convert CKPT --to hf --out DIR``:

- ``config.json``: ``CLIPConfig`` (model_type ``clip``) plus megaclip's own model config under
  ``megaclip_model_config``;
- ``model.safetensors``: the weights (float32), written tensor by tensor from a precomputed
  header, so the whole model never has to sit in memory twice;
- ``preprocessor_config.json``: ``CLIPImageProcessor`` settings of megaclip's eval transform;
- for CLIP BPE: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json`` (``CLIPTokenizer`` pads with id 0, as megaclip and open_clip do).

The key mapping (open_clip key -> HF key) is pure: see :func:`to_hf` / :func:`from_hf` and
docs/checkpoints.md. Writing needs no transformers; :func:`verify_hf` (``--verify``) does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint.openclip import MODEL_CONFIG_KEY, from_open_clip
from megaclip.config.model import ClipConfig, TextConfig, model_from_dict
from megaclip.config.schema import load_mapping, to_dict
from megaclip.data.transforms import CLIP_MEAN, CLIP_STD
from megaclip.errors import CheckpointError, ConfigError
from megaclip.model.naming import to_open_clip_key

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_ARGMAX_EOS = 2  # transformers' CLIPTextTransformer pools at argmax(ids) iff eos_token_id == 2
HF_SOT, HF_EOT, HF_PAD = "<|startoftext|>", "<|endoftext|>", "!"  # "!" is id 0: megaclip's pad

# --------------------------------------------------------------------------- key mapping (pure)

_TOP = {  # open_clip key -> HF key, outside the residual blocks
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # transposed
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
    "logit_scale": "logit_scale",
}
_TRANSPOSED = ("visual.proj", "text_projection")  # open_clip x @ W, HF nn.Linear: W.T
_TOWERS = (  # residual-block prefixes: open_clip, HF
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)
_BLOCK = {  # open_clip block suffix -> HF block suffix
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_QKV = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # -> self_attn.{q,k,v}_proj
_PROJ = ("q_proj", "k_proj", "v_proj")
# HF buffers that older files store and that are recomputed.
_HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_QKV_INV = {v: k for k, v in _QKV.items()}


def _split_block(key: str, towers: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """(the other side's prefix with the layer index, suffix) of a residual-block key, else None."""
    for ours, theirs in towers:
        if key.startswith(ours):
            index, _, suffix = key[len(ours) :].partition(".")
            return f"{theirs}{index}.", suffix
    return None


def hf_keys(oc_key: str) -> tuple[str, ...]:
    """HF key(s) of one open_clip key: three (q, k, v) for ``in_proj_*``, else one."""
    if oc_key in _TOP:
        return (_TOP[oc_key],)
    found = _split_block(oc_key, _TOWERS)
    if found is not None:
        prefix, suffix = found
        if suffix in _BLOCK:
            return (prefix + _BLOCK[suffix],)
        if suffix in _QKV:
            return tuple(f"{prefix}self_attn.{p}.{_QKV[suffix]}" for p in _PROJ)
    raise CheckpointError(
        f"open_clip key '{oc_key}' has no transformers CLIPModel counterpart: only standard ViT "
        "CLIP models can be exported to HF"
    )


def from_hf_key(hf_key: str) -> tuple[str, int | None]:
    """(open_clip key, q/k/v part index or None) of one HF CLIPModel key."""
    if hf_key in _TOP_INV:
        return _TOP_INV[hf_key], None
    found = _split_block(hf_key, [(theirs, ours) for ours, theirs in _TOWERS])
    if found is not None:
        prefix, suffix = found
        if suffix in _BLOCK_INV:
            return prefix + _BLOCK_INV[suffix], None
        proj, _, kind = suffix.removeprefix("self_attn.").partition(".")
        if suffix.startswith("self_attn.") and proj in _PROJ and kind in _QKV_INV:
            return prefix + _QKV_INV[kind], _PROJ.index(proj)
    raise CheckpointError(
        f"HF key '{hf_key}' has no megaclip counterpart: only standard ViT CLIPModel weights "
        "can be imported"
    )


def hf_shapes(oc_key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, shape) of each HF tensor that the open_clip tensor ``oc_key`` of ``shape`` gives."""
    keys = hf_keys(oc_key)
    if len(keys) == 3:
        return [(k, (shape[0] // 3, *shape[1:])) for k in keys]
    if oc_key in _TRANSPOSED:
        return [(keys[0], (shape[1], shape[0]))]
    return [(keys[0], tuple(shape))]


def to_hf(oc_key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """HF (key, tensor) pairs of one open_clip tensor: q/k/v split, projections transposed."""
    keys = hf_keys(oc_key)
    if len(keys) == 3:
        return list(zip(keys, tensor.chunk(3, dim=0)))
    if oc_key in _TRANSPOSED:
        return [(keys[0], tensor.t())]
    return [(keys[0], tensor.reshape(()) if oc_key == "logit_scale" else tensor)]


def from_hf(entries: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """open_clip (key, tensor) pairs of HF (key, tensor) pairs; q/k/v wait for their siblings."""
    pending: dict[str, list[torch.Tensor | None]] = {}
    for hf_key, tensor in entries:
        if hf_key in _HF_IGNORED:
            continue
        oc_key, part = from_hf_key(hf_key)
        if part is None:
            yield oc_key, tensor.t() if oc_key in _TRANSPOSED else tensor
            continue
        parts = pending.setdefault(oc_key, [None, None, None])
        parts[part] = tensor
        if all(p is not None for p in parts):
            del pending[oc_key]
            yield oc_key, torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if pending:
        key = next(iter(pending))
        missing = [p for p, t in zip(_PROJ, pending[key]) if t is None]
        raise CheckpointError(f"HF weights lack {missing[0]} of open_clip '{key}'")


def open_clip_shapes(cfg: ClipConfig) -> dict[str, tuple[int, ...]]:
    """{open_clip key: shape} of every tensor of model ``cfg`` (no memory: meta device)."""
    from megaclip.checkpoint.reader import expected_shapes

    out = {}
    for name, shape in expected_shapes(cfg).items():
        key = to_open_clip_key(name)
        out[key] = () if key == "logit_scale" else tuple(shape)
    return out


def hf_layout(cfg: ClipConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, shape) of every tensor of the HF CLIPModel of ``cfg``, in file order."""
    return [e for key, shape in open_clip_shapes(cfg).items() for e in hf_shapes(key, shape)]


# --------------------------------------------------------------------------- safetensors writer

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsWriter:
    """Write a .safetensors file tensor by tensor, in any order, from a precomputed header."""

    def __init__(
        self,
        path: str | Path,
        layout: Iterable[tuple[str, tuple[int, ...]]],
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot write dtype {dtype} to safetensors here")
        self.path, self.dtype = Path(path), dtype
        self.slots: dict[str, tuple[int, tuple[int, ...]]] = {}
        header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
        offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
        for name, shape in layout:
            size = itemsize * int(torch.Size(shape).numel())
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.slots[name] = (offset, tuple(shape))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file.truncate(self.data_start + offset)
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (converted to the file dtype) at ``name``'s place in the file."""
        if name not in self.slots:
            raise CheckpointError(f"{self.path}: tensor '{name}' is not in the model's layout")
        offset, shape = self.slots[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: '{name}' has shape {tuple(tensor.shape)}, the model needs {shape}"
            )
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self.file.seek(self.data_start + offset)
        self.file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.written.add(name)

    def close(self) -> Path:
        """Check that every tensor was written, then publish the file atomically."""
        missing = [n for n in self.slots if n not in self.written]
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if missing:
            self.tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{self.path}: no tensor was given for '{missing[0]}'")
        os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- configs (pure)


def hf_eos_token_id(text: TextConfig) -> int:
    """HF ``text_config.eos_token_id`` that pools where ``text.pool_type`` does."""
    if text.pool_type == "argmax":
        return HF_ARGMAX_EOS
    if text.pool_type == "eos" and text.eos_id != HF_ARGMAX_EOS:
        return int(text.eos_id)  # type: ignore[arg-type]
    if text.pool_type == "eos":
        raise CheckpointError(
            f"text.eos_id is {HF_ARGMAX_EOS}, which transformers' CLIPModel reads as 'pool at the "
            "largest token id' (its legacy rule): this model cannot be exported to HF with its "
            "pooling; export it to open_clip instead (--to open_clip)"
        )
    raise CheckpointError(
        f"text.pool_type {text.pool_type}: transformers' CLIPModel pools only at the largest "
        "token id (argmax) or at an EOS id; export this model to open_clip instead"
    )


def hf_config(cfg: ClipConfig) -> dict[str, Any]:
    """``config.json`` of the transformers CLIPModel of ``cfg`` (with megaclip's config inside)."""
    if cfg.init_logit_bias is not None:
        raise CheckpointError(
            f"model '{cfg.name}' is a SigLIP model (it has a logit_bias), which transformers' "
            "CLIPModel cannot hold; export it with --to open_clip (open_clip's CLIP keeps "
            "logit_bias)"
        )
    v, t = cfg.vision, cfg.text
    common = {"hidden_act": cfg.activation, "layer_norm_eps": cfg.layer_norm_eps}
    common["projection_dim"] = cfg.embed_dim
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "eos_token_id": hf_eos_token_id(t),
            **common,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "num_channels": v.channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            **common,
        },
        MODEL_CONFIG_KEY: to_dict(cfg),
    }


def _hf_field(section: dict[str, Any], key: str, default: Any, where: str) -> Any:
    value = section.get(key, default)
    if isinstance(value, (list, tuple)):  # image_size / patch_size may be (h, w)
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: {key} {value} is not square; megaclip needs one size")
        value = value[0]
    return value


def clip_config_from_hf(config: dict[str, Any], where: str) -> ClipConfig:
    """ClipConfig of an HF ``CLIPConfig`` mapping (config.json); CheckpointError if not CLIP."""
    kind = config.get("model_type")
    if kind != "clip":
        arch = ", ".join(config.get("architectures") or []) or "no architectures"
        raise CheckpointError(
            f"{where} holds a '{kind}' model ({arch}), not a CLIP model: megaclip imports only "
            "transformers CLIPModel directories (model_type 'clip')"
        )
    t, v = config.get("text_config") or {}, config.get("vision_config") or {}
    acts = {t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu")}
    eps = {float(t.get("layer_norm_eps", 1e-5)), float(v.get("layer_norm_eps", 1e-5))}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise CheckpointError(
            f"{where}: hidden_act {sorted(acts)}; megaclip supports one of gelu / quick_gelu for "
            "both towers"
        )
    if len(eps) != 1:
        raise CheckpointError(f"{where}: layer_norm_eps differ between towers {sorted(eps)}")
    eos = t.get("eos_token_id", 49407)  # transformers' default
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise CheckpointError(f"{where}: text_config.eos_token_id {eos!r} is not one token id")
    pooling = (
        {"pool_type": "argmax"} if eos == HF_ARGMAX_EOS else {"pool_type": "eos", "eos_id": eos}
    )
    stored = config.get(MODEL_CONFIG_KEY) or {}
    data = {
        "name": stored.get("name", Path(where).name or "hf"),
        "embed_dim": config.get("projection_dim", 512),
        "activation": acts.pop(),
        "layer_norm_eps": eps.pop(),
        "vision": {
            "image_size": _hf_field(v, "image_size", 224, where),
            "patch_size": _hf_field(v, "patch_size", 32, where),
            "width": v.get("hidden_size", 768),
            "layers": v.get("num_hidden_layers", 12),
            "heads": v.get("num_attention_heads", 12),
            "mlp_dim": v.get("intermediate_size", 3072),
            "channels": v.get("num_channels", 3),
        },
        "text": {
            "context_length": t.get("max_position_embeddings", 77),
            "vocab_size": t.get("vocab_size", 49408),
            "width": t.get("hidden_size", 512),
            "layers": t.get("num_hidden_layers", 12),
            "heads": t.get("num_attention_heads", 8),
            "mlp_dim": t.get("intermediate_size", 2048),
            **pooling,
        },
    }
    for key in ("init_logit_scale", "max_logit_scale"):  # training settings HF does not carry
        if key in stored:
            data[key] = stored[key]
    try:
        return model_from_dict(data, where=f"{where} ({HF_CONFIG})")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def hf_preprocessor_config(cfg: ClipConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` (CLIPImageProcessor) of megaclip's eval transform."""
    size = cfg.vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


# --------------------------------------------------------------------------- tokenizer files


def hf_tokenizer_config(context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` of a CLIPTokenizer whose ids equal megaclip's CLIP BPE."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "bos_token": HF_SOT,
        "eos_token": HF_EOT,
        "unk_token": HF_EOT,
        "pad_token": HF_PAD,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        # pad "!" (id 0) is a special token: without this a "!" in a caption would become it
        "split_special_tokens": True,
    }


def write_hf_tokenizer(out_dir: Path, bpe_path: str, context_length: int) -> list[str]:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; their names."""
    from megaclip.tokenizer.bpe import EOT_TEXT, SOT_TEXT, load_bpe_vocab

    vocab = load_bpe_vocab(bpe_path)
    rename = {SOT_TEXT: HF_SOT, EOT_TEXT: HF_EOT}
    ids = {rename.get(tok, tok): i for i, tok in enumerate(vocab.id_to_token)}
    merges = sorted(vocab.merge_ranks, key=vocab.merge_ranks.__getitem__)
    special = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_PAD}
    files = {
        "vocab.json": json.dumps(ids, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(hf_tokenizer_config(context_length), indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return list(files)


# --------------------------------------------------------------------------- export / import


def write_hf_dir(
    out_dir: str | Path,
    cfg: ClipConfig,
    entries: Iterable[tuple[str, torch.Tensor]],
    *,
    bpe_path: str | None = None,
) -> list[str]:
    """An HF CLIPModel directory from (open_clip key, tensor) pairs; the file names written.

    ``bpe_path``: the CLIP BPE merges file whose tokenizer files to add (None: none).
    """
    out = Path(out_dir)
    config = hf_config(cfg)  # refuses pooling HF cannot express before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with SafetensorsWriter(out / HF_WEIGHTS, hf_layout(cfg), metadata={"format": "pt"}) as w:
        for oc_key, tensor in entries:
            for hf_key, part in to_hf(oc_key, tensor):
                w.write(hf_key, part)
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    text = json.dumps(hf_preprocessor_config(cfg), indent=2) + "\n"
    (out / "preprocessor_config.json").write_text(text, encoding="utf-8")
    names = [HF_CONFIG, HF_WEIGHTS, "preprocessor_config.json"]
    if bpe_path is not None:
        names += write_hf_tokenizer(out, bpe_path, cfg.text.context_length)
    return names


def export_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    fp32_master: bool = False,
    tokenizer: str = "clip_bpe",
    tokenizer_path: str | None = None,
) -> list[str]:
    """``megaclip convert CKPT --to hf``: an HF CLIPModel directory of a megaclip checkpoint."""
    from megaclip.checkpoint.export import model_source
    from megaclip.tokenizer import build_tokenizer
    from megaclip.tokenizer.pooling import check_tokenizer

    source = model_source(ckpt, fp32_master=fp32_master)  # streamed, one tensor at a time
    cfg = source.cfg
    tok = build_tokenizer(tokenizer, tokenizer_path, cfg.text.context_length)
    check_tokenizer(cfg.text, tok, tokenizer)
    bpe = tok.bpe_path if tokenizer == "clip_bpe" else None  # type: ignore[attr-defined]
    return write_hf_dir(out_dir, cfg, source.open_clip_items(), bpe_path=bpe)


def read_hf_config(hf_dir: str | Path) -> ClipConfig:
    """The ClipConfig of an HF model directory (CheckpointError unless a CLIPModel's)."""
    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{hf_dir} is not a Hugging Face model directory: it has no {HF_CONFIG}"
        )
    try:
        config = load_mapping(path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return clip_config_from_hf(config, str(hf_dir))


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / HF_WEIGHTS).is_file():
        return [hf_dir / HF_WEIGHTS]
    if (hf_dir / HF_INDEX).is_file():
        index = json.loads((hf_dir / HF_INDEX).read_text(encoding="utf-8"))
        return [hf_dir / name for name in dict.fromkeys(index["weight_map"].values())]
    if (hf_dir / HF_BIN).is_file():
        return [hf_dir / HF_BIN]
    raise CheckpointError(f"{hf_dir} has no {HF_WEIGHTS}, {HF_INDEX} or {HF_BIN}")


def iter_hf_tensors(hf_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) of an HF directory's weights, one tensor at a time (sharded files too)."""
    for path in _weight_files(Path(hf_dir)):
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            continue
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield key, f.get_tensor(key)
        except OSError as err:
            raise CheckpointError(f"cannot read {path} ({err})") from None


def read_hf(hf_dir: str | Path) -> tuple[ClipConfig, dict[str, torch.Tensor]]:
    """(ClipConfig, open_clip state dict) of an HF CLIPModel directory."""
    cfg = read_hf_config(hf_dir)
    return cfg, dict(from_hf(iter_hf_tensors(hf_dir)))


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1) -> Path:
    """``megaclip convert HF_DIR --to megaclip``: an HF CLIPModel -> a universal init directory."""
    from megaclip.checkpoint.export import check_layout
    from megaclip.checkpoint.universal import check_shapes, write_universal

    cfg, oc_state = read_hf(hf_dir)
    check_layout(cfg, tp, pp)
    params = from_open_clip(oc_state)
    check_shapes(params, cfg, str(hf_dir))
    return write_universal(out_dir, cfg, params, step=0, source={"hf": str(hf_dir)})


# --------------------------------------------------------------------------- verification


def load_transformers():
    """The transformers module; CheckpointError naming the extra when it is not installed."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "this needs Hugging Face transformers: pip install megaclip[hf]"
        ) from None
    return transformers


VERIFY_TEXTS = (
    "a photo of a cat.",
    "A Diagram of the GPU's memory hierarchy, 2nd edition!",
    "the number seven written by hand " * 12,  # longer than 77 tokens: truncation
)


def _features(out: Any) -> torch.Tensor:
    """Projected features of get_*_features (transformers 5: an output object; 4: a tensor)."""
    return getattr(out, "pooler_output", out)


@torch.no_grad()
def verify_hf(hf_dir: str | Path, model: torch.nn.Module, tokenizer, seed: int = 0) -> dict:
    """Load ``hf_dir`` with transformers; compare its features (and tokenizer) with ``model``'s.

    ``model``: a megaclip ClipModel of the same weights; ``tokenizer``: its megaclip tokenizer.
    Returns {"image_max_abs_diff", "text_max_abs_diff", "token_ids_equal" (None: no tokenizer
    files)}, features unnormalised, float32.
    """
    tf = load_transformers()
    hf = tf.CLIPModel.from_pretrained(str(hf_dir)).eval()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    images = torch.randn(2, v.channels, v.image_size, v.image_size, generator=gen)
    tokens = tokenizer(list(VERIFY_TEXTS))
    model = model.float().eval()
    image_diff = _features(hf.get_image_features(pixel_values=images)) - model.encode_image(
        images, normalize=False
    )
    text_diff = _features(hf.get_text_features(input_ids=tokens)) - model.encode_text(
        tokens, normalize=False
    )
    same_ids = None
    if (Path(hf_dir) / "vocab.json").is_file():
        hf_tok = tf.CLIPTokenizer.from_pretrained(str(hf_dir))
        ids = hf_tok(list(VERIFY_TEXTS), padding="max_length", truncation=True)["input_ids"]
        same_ids = torch.equal(torch.tensor(ids), tokens)
    return {
        "image_max_abs_diff": float(image_diff.abs().max()),
        "text_max_abs_diff": float(text_diff.abs().max()),
        "token_ids_equal": same_ids,
    }
