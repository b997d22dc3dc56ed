"""Checkpoints: save and load a `Transformer` in three layouts, lazily and shard by shard.

Layouts, auto-detected from the tensor names:

* native    our own: `config.json` holding every ModelConfig field (`cfg.to_dict()`), and
            `model.safetensors` with `model.state_dict()` names (routed experts stacked
            `[E, out, in]`, the `tid2eid` buffers, MTP), in the dtypes the model had.
* official  DeepSeek's release layout (the HF repos' `model.safetensors.index.json`): no
            `model.` prefix, routed experts one tensor per expert
            (`layers.L.ffn.experts.{e}.w1.weight`), FP8 E4M3 weights with 128x128 E8M0
            `.scale` tensors, FP4 E2M1 routed experts packed two per byte with 1x32 E8M0 scales
            (`quant.py`); the official `config.json` (its `expert_dtype` decides the experts'
            encoding, `quantization_config` the rest).
* hf        transformers: what `DeepseekV4ForCausalLM.save_pretrained` writes (the official
            names with a `model.` prefix, see `convert.hf_saved_name`), and on reading also the
            runtime names (`model.layers.L.self_attn...`, stacked `gate_up_proj`).

Every layout may be sharded: `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`. A run directory (`dsv4 train`) holds
`checkpoints/step_000040/` (native) and `checkpoints/latest` (the name of the newest);
`load(RUN)` loads that one.

Loading builds the network on the meta device, checks every tensor of the files against what
the config implies (names, shapes, dtypes: errors name the file and the tensor, nothing is
skipped), then fills the parameters shard by shard, tensor by tensor, from private memory maps,
so the peak memory is about the model plus one tensor (bench/checkpoint_memory.py measures
it). `quantized=True` keeps FP8/FP4 weights as they are and dequantizes them inside the matmul
(`quant.FP8Linear`, `quant.QuantizedExperts`), swapped into the network from the outside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsv4.errors import Error
from dsv4.files import (
    atomic_write,
    remove_temp_leftovers,
    with_path,
    write_json_atomic,
    write_text_atomic,
)
from dsv4.model import quant
from dsv4.model.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from dsv4.model.network import Transformer
    from dsv4.text.tokenizer import Tokenizer

FORMATS = ("native", "official", "hf")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
LATEST_NAME = "latest"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


class CheckpointError(Error, ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor."""


# =============================================================================================
# safetensors files: header parsing, memory-mapped reads, sharded atomic writes
# =============================================================================================
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FLOAT_NAMES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype name, shape and byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a .safetensors header: every byte range must lie inside the file and
    match its dtype and shape, so a truncated or damaged file fails here, naming the tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, no safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header "
                                      f"claims {header_len} bytes, file has {size})")
            raw = f.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, base, size)
    return infos


def _tensor_info(path: Path, name: str, entry: Any, base: int, size: int) -> TensorInfo:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry") from None
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
    info = TensorInfo(name, path, dtype, shape, base + int(start), base + int(end))
    expected = info.numel * DTYPES[dtype].itemsize
    if info.nbytes != expected or start < 0:
        raise CheckpointError(f"{path}: tensor {name!r}: header gives {info.nbytes} bytes for "
                              f"{dtype} {list(shape)} ({expected} expected)")
    if info.end > size:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to "
                              f"{info.end}, the file has {size}")
    return info


class SafetensorsFolder:
    """The tensors of a folder of .safetensors files (with or without an index).

    Construction reads and checks every header and the index (a shard the index names must
    exist and hold the tensors the index places in it). Tensor data is read on demand from
    private memory maps (`get`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.infos: dict[str, TensorInfo] = {}
        index = folder / INDEX_NAME
        if index.is_file():
            self._read_index(index)
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no *.safetensors files and no {INDEX_NAME}")
            for file in files:
                for name, info in read_header(file).items():
                    if name in self.infos:
                        raise CheckpointError(f"{file}: tensor {name!r} is also in "
                                              f"{self.infos[name].file.name}")
                    self.infos[name] = info

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object of "
                                  "tensor name -> file)") from None
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            by_file[str(file)].append(name)
        for file, names in sorted(by_file.items()):
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"{path}: missing shard (the index places {len(names)} "
                                      f"tensor(s) there, e.g. {names[0]!r})")
            header = read_header(path)
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{path}: tensor {name!r} is missing (the index "
                                          "places it in this file)")
                self.infos[name] = header[name]
            extra = sorted(set(header) - set(names))
            if extra:
                raise CheckpointError(f"{path}: tensor {extra[0]!r} is not listed in "
                                      f"{INDEX_NAME}")

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as a view of a private memory map of its file (no copy; copy it
        to keep it). Each call maps the file afresh and the map goes away with the last view,
        so pages read for one tensor do not stay resident while the next is read: the load's
        overhead above the model is about one tensor, not one shard."""
        info = self.infos[name]
        size = info.file.stat().st_size
        # shared=False: a private (copy-on-write) map; the file is never modified.
        storage = torch.UntypedStorage.from_file(str(info.file), shared=False, nbytes=size)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)[info.start : info.end]
        dtype = DTYPES[info.dtype]
        if info.start % dtype.itemsize:  # unaligned in a foreign file: copy to align
            raw = raw.clone()
        return raw.view(dtype).reshape(info.shape)


def _save_file_atomic(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write one .safetensors file (tmp + rename). Larger element sizes first keeps every
    tensor aligned to its element size."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r}: dtype {t.dtype} has no "
                                  "safetensors name")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.view(torch.uint8).reshape(-1).numpy().data)  # no extra copy


def write_sharded(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write (name, tensor) pairs as `model.safetensors`, or as numbered shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`. Holds at most one
    shard in memory (the pairs may be produced lazily, e.g. quantized one at a time)."""
    written: list[tuple[Path, list[str]]] = []  # temp shard file, its tensor names
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    seen: set[str] = set()

    def flush() -> None:
        path = folder / f".shard-{len(written) + 1:05d}.safetensors"
        _save_file_atomic(path, shard)
        written.append((path, list(shard)))

    for name, tensor in tensors:
        if name in seen:
            raise CheckpointError(f"{folder}: tensor {name!r} written twice")
        seen.add(name)
        n = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + n > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += n
    flush()
    total = len(written)
    # Numbered names need the count, known only now: rename the temp shards.
    finals = [folder / WEIGHTS_NAME] if total == 1 else \
        [folder / f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    for (tmp, _), final in zip(written, finals):
        os.replace(tmp, final)
    if total > 1:
        weight_map = {name: final.name for (_, names), final in zip(written, finals)
                      for name in names}
        total_size = sum(f.stat().st_size for f in finals)
        write_json_atomic(folder / INDEX_NAME, {"metadata": {"total_size": total_size},
                                                "weight_map": dict(sorted(weight_map.items()))})
    return finals


# =============================================================================================
# layouts: how each of our state-dict tensors is stored in each format
# =============================================================================================
# Storage classes of the released checkpoints (their `quantization_config`).
_FP8_CLASS = re.compile(
    r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]"
    r"|(^|\.)[eh]_proj)\.weight$")
_F32_CLASS = re.compile(r"(attn_sink|gate\.bias|\.ape|(^|\.)hc_\w+)$")
_ROUTED = re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.experts)\.(w[123])$")
_WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def storage_class(name: str) -> str:
    """"routed", "fp8", "f32", "i64" or "bf16": how the official release stores `name`."""
    if _ROUTED.match(name):
        return "routed"
    if name.endswith("tid2eid"):
        return "i64"
    if _FP8_CLASS.search(name):
        return "fp8"
    if _F32_CLASS.search(name):
        return "f32"
    return "bf16"


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor (and its scale) feeding all or part of one of our tensors.

    encoding: "plain" (any float, or int for tid2eid), "fp8" (E4M3 + 128x128 scales) or
    "fp4" (packed E2M1 + 1x32 scales). expert: index into a stacked [E, out, in] target.
    half: 0/1 = the first/second half (dim -2) of the disk tensor (transformers gate_up_proj).
    """

    disk: str
    target: str
    encoding: str = "plain"
    scale: str | None = None
    expert: int | None = None
    half: int | None = None
    shape: tuple[int, ...] = ()  # the dense shape this piece produces

    def disk_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """Expected shapes of the weight and the scale on disk."""
        if self.encoding == "plain" and self.half is None:
            return self.shape, None
        *lead, rows, cols = self.shape
        if self.encoding == "fp8":
            b = quant.WEIGHT_FP8_BLOCK
            return self.shape, (*lead, -(-rows // b), -(-cols // b))
        if self.encoding == "fp4":
            return (*lead, rows, -(-cols // 2)), (*lead, rows, -(-cols // quant.FP4_BLOCK))
        return (*lead, 2 * rows, cols), None  # one half of gate_up_proj


def _official_pieces(name: str, shape: tuple[int, ...], cfg: ModelConfig,
                     scale_suffix: str = "scale") -> list[Piece]:
    cls = storage_class(name)
    routed = _ROUTED.match(name)
    if routed:
        encoding = {"fp4": "fp4", "fp8": "fp8", "bf16": "plain"}[cfg.expert_dtype]
        prefix, w = routed.groups()
        pieces = []
        for e in range(shape[0]):
            base = f"{prefix}.{e}.{w}"
            pieces.append(Piece(f"{base}.weight", name, encoding,
                                f"{base}.{scale_suffix}" if encoding != "plain" else None,
                                expert=e, shape=tuple(shape[1:])))
        return pieces
    if cls == "fp8" and cfg.dtype == "fp8":
        base = name[: -len(".weight")]
        return [Piece(name, name, "fp8", f"{base}.{scale_suffix}", shape=tuple(shape))]
    return [Piece(name, name, shape=tuple(shape))]


def layout(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], fmt: str) -> list[Piece]:
    """The pieces of `fmt` for a model whose state-dict shapes are `shapes`.

    fmt: "native", "official", "hf" (what save_pretrained writes) or "hf-runtime" (the
    transformers parameter names; read only).
    """
    from dsv4.weights.convert import hf_runtime_name, hf_saved_name

    pieces: list[Piece] = []
    for name, shape in shapes.items():
        if fmt == "native":
            pieces.append(Piece(name, name, shape=tuple(shape)))
        elif fmt == "official":
            pieces += _official_pieces(name, shape, cfg)
        elif fmt == "hf":
            for p in _official_pieces(name, shape, cfg, scale_suffix="weight_scale_inv"):
                scale = hf_saved_name(p.scale) if p.scale else None
                pieces.append(Piece(hf_saved_name(p.disk), p.target, p.encoding, scale,
                                    p.expert, shape=p.shape))
        elif fmt == "hf-runtime":
            mapped = hf_runtime_name(name)
            if mapped is not None:
                pieces.append(Piece(mapped[0], name, half=mapped[1], shape=tuple(shape)))
        else:
            raise ValueError(f"format={fmt!r}: must be one of {FORMATS}")
    return pieces


def detect_format(names: Iterable[str], where: Path | str = "<tensors>") -> str:
    """"native", "official", "hf" or "hf-runtime", from tensor names alone."""
    names = list(names)
    if any(".self_attn." in n or n.endswith("gate_up_proj") for n in names):
        return "hf-runtime"
    if any(n.startswith("model.") for n in names):
        return "hf"
    if any(_ROUTED.match(n) for n in names):
        return "native"
    if any(re.match(r"^(layers|mtp)\.\d+\.ffn\.experts\.\d+\.", n) for n in names):
        return "official"
    example = names[0] if names else "(no tensors)"
    raise CheckpointError(f"{where}: cannot tell the checkpoint layout from its tensor names "
                          f"(e.g. {example!r}); expected DeepSeek-V4 names (native, official "
                          "or transformers)")


# =============================================================================================
# run directories
# =============================================================================================
def resolve(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder `path` names: itself, or for a run directory (or its
    `checkpoints/` folder) the checkpoint named in `checkpoints/latest`."""
    target = Path(path)
    if not target.exists():
        raise CheckpointError(f"{target}: no such file or directory")
    if target.is_file():
        if target.name in (CONFIG_NAME, INDEX_NAME) or target.suffix == ".safetensors":
            return target.parent
        raise CheckpointError(f"{target}: expected a checkpoint folder")
    for checkpoints in (target / "checkpoints", target):
        folder = read_latest(checkpoints)
        if folder is not None:
            return folder
    return target


def read_latest(checkpoints: Path) -> Path | None:
    """The checkpoint folder `checkpoints/latest` names (None without a `latest` file). The
    name must be a folder directly inside `checkpoints/`: `latest` never leads outside it."""
    latest = checkpoints / LATEST_NAME
    if not latest.is_file():
        return None
    raw = latest.read_bytes()[:4096]
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{latest}: not a checkpoint name (binary content: "
                              f"{raw[:16]!r}...); point it at a step_* folder or remove it"
                              ) from None
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\n" in name:
        raise CheckpointError(f"{latest}: {name[:80]!r} is not the name of a checkpoint "
                              f"folder inside {checkpoints}")
    folder = checkpoints / name
    if not folder.is_dir():
        raise CheckpointError(f"{latest}: names checkpoint {name!r}, which does not exist in "
                              f"{checkpoints}")
    return folder


def find_tokenizer(path: str | os.PathLike[str]) -> Path | None:
    """`tokenizer.json` of a checkpoint: in its folder, else in its run directory."""
    folder = resolve(path)
    candidates = [folder / TOKENIZER_NAME]
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / TOKENIZER_NAME)
    return next((c for c in candidates if c.is_file()), None)


def run_checkpoint(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Where a run directory keeps the checkpoint of `step`: `RUN/checkpoints/step_{step:06d}`."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def mark_latest(folder: Path) -> None:
    """Point `checkpoints/latest` at the checkpoint `folder` inside it. Call it last, once the
    folder is complete: the atomic write means `latest` always names a whole checkpoint."""
    write_text_atomic(folder.parent / LATEST_NAME, folder.name + "\n")


def save_to_run(model: Transformer, run_dir: str | os.PathLike[str], step: int,
                tokenizer: Tokenizer | None = None, **save_kwargs: Any) -> Path:
    """Save a native checkpoint as `RUN/checkpoints/step_{step:06d}` and point
    `RUN/checkpoints/latest` at it (written last, atomically)."""
    folder = run_checkpoint(run_dir, step)
    folder.parent.mkdir(parents=True, exist_ok=True)
    save(model, folder, format="native", tokenizer=tokenizer, **save_kwargs)
    mark_latest(folder)
    return folder



# =============================================================================================
# reading: config, plan, checks
# =============================================================================================
@dataclass
class CheckpointPlan:
    """Everything known about a checkpoint folder before reading tensor data."""

    folder: Path
    format: str  # native / official / hf / hf-runtime
    config: ModelConfig
    files: SafetensorsFolder
    pieces: list[Piece]
    shapes: dict[str, tuple[int, ...]]  # our state-dict names -> shapes
    dtypes: dict[str, torch.dtype]  # our state-dict names -> dtype of a fresh model
    notes: list[str] = field(default_factory=list)

    @property
    def layout_name(self) -> str:
        return "hf" if self.format == "hf-runtime" else self.format


def _read_config(folder: Path, fmt: str) -> tuple[ModelConfig, bool]:
    """The config, and whether it names the routed experts' dtype (the first upload of the
    official weights has a root config.json without `expert_dtype`)."""
    path = folder / CONFIG_NAME
    if not path.is_file() and (folder / "inference" / CONFIG_NAME).is_file():
        path = folder / "inference" / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a checkpoint needs its config)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from None
    try:
        if fmt == "native" and isinstance(data, dict) and "quant_sim" in data:
            return ModelConfig.from_dict(data), True  # our own field names, every field
        qc = data.get("quantization_config") if isinstance(data, dict) else None
        named = isinstance(data, dict) and ("expert_dtype" in data or (
            isinstance(qc, dict) and "expert_dtype" in qc))
        return ModelConfig.from_config_dict(data, str(path)), named
    except ConfigError as err:
        message = str(err)
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") \
            from None
    except TypeError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _model_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    from dsv4.model.network import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    state = model.state_dict()
    return ({k: tuple(v.shape) for k, v in state.items()},
            {k: v.dtype for k, v in state.items()})


def _without_mtp(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])


_EXPERT_DTYPE_ON_DISK = {"I8": "fp4", "U8": "fp4", "F8_E4M3": "fp8"}  # any float: "bf16"
_PER_EXPERT = re.compile(r"^(model\.)?(layers|mtp)\.\d+\.(ffn|mlp)\.experts\.\d+\.\w+\.weight$")


def _expert_dtype_on_disk(files: SafetensorsFolder) -> str | None:
    """"fp4", "fp8" or "bf16": how the files store the per-expert weights (None: stacked)."""
    name = next((n for n in files.infos if _PER_EXPERT.match(n)), None)
    if name is None:
        return None
    return _EXPERT_DTYPE_ON_DISK.get(files.infos[name].dtype, "bf16")


def plan(path: str | os.PathLike[str]) -> CheckpointPlan:
    """Read and check a checkpoint's config, index and headers (no tensor data): every tensor
    the config implies must be there with the right shape and dtype, and nothing else.

    Two gaps are filled from the files, each with a note: a config without `expert_dtype`
    takes the experts' dtype on disk, and a checkpoint without mtp.* tensors (transformers
    drops them on save, some re-quantised uploads ship none) loads without the MTP block,
    which only speculative decoding needs."""
    folder = resolve(path)
    files = SafetensorsFolder(folder)
    fmt = detect_format(files.infos, folder)
    cfg, names_expert_dtype = _read_config(folder, fmt)
    notes = []
    on_disk = None if names_expert_dtype else _expert_dtype_on_disk(files)
    if on_disk is not None and on_disk != cfg.expert_dtype:
        cfg = cfg.replace(expert_dtype=on_disk)
        notes.append(f"config.json names no expert_dtype: {on_disk} experts, as the files "
                     "store them")
    if cfg.n_mtp_layers and not any(n.startswith("mtp.") for n in files.infos):
        cfg = _without_mtp(cfg)
        notes.append("no mtp.* tensors: loaded without the MTP block (only speculative "
                     "decoding needs it)")
    shapes, dtypes = _model_shapes(cfg)
    pieces = layout(cfg, shapes, fmt)
    _check(folder, files, pieces, dtypes, fmt)
    return CheckpointPlan(folder, fmt, cfg, files, pieces, shapes, dtypes, notes)


def _check(folder: Path, files: SafetensorsFolder, pieces: list[Piece],
           dtypes: dict[str, torch.dtype], fmt: str) -> None:
    infos = files.infos
    config = folder / CONFIG_NAME
    expected: set[str] = set()
    for p in pieces:
        expected.add(p.disk)
        if p.scale:
            expected.add(p.scale)
    ignorable = re.compile(r"(inv_freq|rotary_emb\.)")  # non-persistent buffers
    extra = sorted(n for n in set(infos) - expected if not ignorable.search(n))
    if extra:
        name = extra[0]
        raise CheckpointError(f"{infos[name].file}: unexpected tensor {name!r}: the model "
                              f"described by {config} has no such tensor ({len(extra)} "
                              f"unexpected in all)")
    for p in pieces:
        for name in (p.disk, p.scale):
            if name and name not in infos:
                raise CheckpointError(f"{folder}: missing tensor {name!r} ({fmt} layout; "
                                      f"needed for {p.target!r})")
        _check_piece(p, infos, dtypes[p.target], config)


def _check_piece(p: Piece, infos: dict[str, TensorInfo], target_dtype: torch.dtype,
                 config: Path) -> None:
    """dtype first (a wrong encoding also gives a wrong shape), then the shapes."""
    weight = infos[p.disk]
    want_shape, want_scale = p.disk_shapes()
    where = f"{weight.file}: tensor {p.disk!r}"
    if p.encoding == "plain":
        ok = weight.dtype in _FLOAT_NAMES if target_dtype.is_floating_point else \
            weight.dtype in ("I64", "I32")
        if not ok:
            kind = "a float dtype" if target_dtype.is_floating_point else "I64 or I32"
            raise CheckpointError(f"{where}: dtype {weight.dtype}, expected {kind}")
    else:
        want = "F8_E4M3" if p.encoding == "fp8" else "I8"
        if weight.dtype != want and not (p.encoding == "fp4" and weight.dtype == "U8"):
            raise CheckpointError(f"{where}: dtype {weight.dtype}, expected {want} "
                                  f"({p.encoding.upper()} weights per {config})")
    if weight.shape != tuple(want_shape):
        raise CheckpointError(f"{where}: shape {list(weight.shape)}, but {config} implies "
                              f"{list(want_shape)}")
    if p.scale is None:
        return
    scale = infos[p.scale]
    if scale.dtype not in ("F8_E8M0", "F32"):
        raise CheckpointError(f"{scale.file}: tensor {p.scale!r}: dtype {scale.dtype}, "
                              "expected F8_E8M0 (or F32)")
    if scale.shape != tuple(want_scale):
        raise CheckpointError(f"{scale.file}: tensor {p.scale!r}: shape {list(scale.shape)}, "
                              f"expected {list(want_scale)} for {p.encoding.upper()} weight "
                              f"{list(weight.shape)}")


# =============================================================================================
# loading
# =============================================================================================
def _target_dtype(piece: Piece, files: SafetensorsFolder, dtype: torch.dtype | None,
                  like: torch.dtype) -> torch.dtype:
    """dtype of one of our tensors after loading: `dtype` for floats when given (fp32 for
    the tensors the reference keeps in fp32, `network.keeps_fp32`), else as stored (FP8/FP4
    dequantize exactly into bf16); integer buffers keep their model dtype."""
    from dsv4.model.network import keeps_fp32

    if not like.is_floating_point:
        return like
    if dtype is not None:
        return torch.float32 if keeps_fp32(piece.target) else dtype
    if piece.encoding != "plain":
        return torch.bfloat16
    return DTYPES[files.infos[piece.disk].dtype]


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {**_WEIGHT_DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}
    if dtype not in names:
        raise CheckpointError(f"dtype={dtype!r}: must be one of {sorted(_WEIGHT_DTYPES)}")
    return names[dtype]


def load(path: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, *, quantized: bool = False,
         progress: bool = False, verify: bool = True) -> Transformer:
    """Load a checkpoint folder or run directory of any layout (detected from tensor names).

    dtype: of the floating-point parameters ("fp32", "bf16", "fp16" or a torch dtype), except
    those the official inference code keeps in fp32 (`network.keeps_fp32`: routing bias, mHC,
    sinks, compressors, head), which stay fp32; None keeps each tensor's stored dtype, FP8/FP4
    weights dequantized (exactly) to bf16.
    device: where the weights go (default CPU; tensors stream there one at a time).
    quantized: keep FP8/FP4 weights in memory and dequantize in the matmul.
    verify: check every value as it is loaded (`check_values`: finite, within
    +-MAX_WEIGHT_MAGNITUDE, hash-routing ids in range); a corrupted tensor is a
    CheckpointError naming the file, tensor and index.
    """
    p = plan(path)
    return load_plan(p, dtype=dtype, device=device, quantized=quantized, progress=progress,
                     verify=verify)


def load_plan(p: CheckpointPlan, dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, *, quantized: bool = False,
              progress: bool = False, verify: bool = True) -> Transformer:
    from tqdm import tqdm

    from dsv4.model.network import Transformer

    device = torch.device(device) if device is not None else torch.device("cpu")
    want = _parse_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(p.config)
    keep = _quantized_targets(p) if quantized else {}
    first_piece = {}
    for piece in p.pieces:
        first_piece.setdefault(piece.target, piece)
    targets = {}
    for name, shape in p.shapes.items():
        if name not in keep:
            dtype_of = _target_dtype(first_piece[name], p.files, want, p.dtypes[name])
            targets[name] = torch.empty(shape, dtype=dtype_of, device=device)
    raw = {n: {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in parts.items()}
           for n, parts in keep.items()}
    by_file: dict[Path, list[Piece]] = defaultdict(list)
    for piece in p.pieces:
        by_file[p.files.infos[piece.disk].file].append(piece)
    bar = tqdm(total=len(p.pieces), desc="loading", unit="tensor", disable=not progress)
    try:
        for file in sorted(by_file):  # one memory-mapped shard at a time
            for piece in by_file[file]:
                if piece.target in raw:
                    _fill_raw(raw[piece.target], piece, p.files)
                    if verify:
                        _check_raw(raw[piece.target], piece, file)
                else:
                    filled = _fill(targets[piece.target], piece, p.files)
                    if verify:
                        check_values(filled, f"{file}: tensor {piece.disk!r}",
                                     _id_bound(piece.target, p.config))
                bar.update()
    finally:
        bar.close()
    _install(model, targets, device)
    for name, parts in raw.items():
        _install_quantized(model, name, parts, p, want or torch.bfloat16)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a bug here, never a silent partial load
        raise CheckpointError(f"internal: tensors left unloaded: {left[:5]}")
    model.eval()
    return model


def _fill(target: torch.Tensor, piece: Piece, files: SafetensorsFolder) -> torch.Tensor:
    """Copy one piece into its (slice of the) target tensor, dequantizing if needed; returns
    the part it filled."""
    with torch.no_grad():
        dst = target[piece.expert] if piece.expert is not None else target
        if piece.encoding == "plain":
            src = files.get(piece.disk)
            if piece.half is not None:
                rows = src.shape[-2] // 2
                src = src[..., piece.half * rows : (piece.half + 1) * rows, :]
            dst.copy_(src)
        elif piece.encoding == "fp8":
            dst.copy_(quant.dequantize_fp8(files.get(piece.disk), files.get(piece.scale)))
        else:
            dst.copy_(quant.dequantize_fp4(files.get(piece.disk), files.get(piece.scale),
                                           piece.shape[-1]))
    return dst


# ---- checking the values: corrupted files must not load as a model that babbles ---------------
# No trained weight comes near this magnitude; a flipped high exponent bit (the corruption that
# turns a model into garbage) multiplies a weight by 2^32 or more and lands far beyond it.
MAX_WEIGHT_MAGNITUDE = 1e6
_CHECK_BLOCK = 1 << 24  # elements per reduction: no copy of a whole large tensor


def _id_bound(target: str, cfg: ModelConfig) -> int | None:
    return cfg.n_routed_experts if target.endswith(".tid2eid") else None


def check_values(tensor: torch.Tensor, where: str, id_bound: int | None = None) -> None:
    """Every float finite and within +-MAX_WEIGHT_MAGNITUDE; integer ids (a `tid2eid` table's
    experts) in [0, id_bound). Cost: one more read of the loaded weights (aminmax per block),
    measured by bench/checkpoint_memory.py."""
    if tensor.numel() == 0:
        return
    flat = tensor.detach().reshape(-1)
    if not tensor.is_floating_point():
        low, high = int(flat.min()), int(flat.max())
        if id_bound is not None and (low < 0 or high >= id_bound):
            bad = low if low < 0 else high
            raise CheckpointError(f"{where}: expert id {bad} outside [0, {id_bound}) "
                                  "(n_routed_experts): a corrupted hash-routing table")
        return
    for start in range(0, flat.numel(), _CHECK_BLOCK):
        low, high = torch.aminmax(flat[start:start + _CHECK_BLOCK])
        low, high = float(low), float(high)
        if not (-MAX_WEIGHT_MAGNITUDE <= low and high <= MAX_WEIGHT_MAGNITUDE):  # NaN fails
            _report_bad_value(tensor, where)


def _report_bad_value(tensor: torch.Tensor, where: str) -> None:
    values = tensor.detach().float()
    bad = ~torch.isfinite(values) | (values.abs() > MAX_WEIGHT_MAGNITUDE)
    index = [int(i) for i in bad.nonzero()[0]]
    value = float(values[tuple(index)])
    what = ("NaN" if value != value else f"{value:g}" if abs(value) != float("inf") else
            f"{value}")
    count = int(bad.sum())
    raise CheckpointError(f"{where}: holds {what} at index {index} ({count} value(s) not "
                          f"finite or beyond +-{MAX_WEIGHT_MAGNITUDE:g}): corrupted weights "
                          "(pass verify=False to load them anyway)")


def _check_raw(parts: dict[str, torch.Tensor], piece: Piece, file: Path) -> None:
    """Kept-quantized weights: no NaN codes (E4M3 0x7F/0xFF, E8M0 0xFF), scales in range."""
    weight = parts["weight"] if piece.expert is None else parts["weight"][piece.expert]
    scale = parts["scale"] if piece.expert is None else parts["scale"][piece.expert]
    if weight.dtype == torch.float8_e4m3fn and \
            bool(((weight.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise CheckpointError(f"{file}: tensor {piece.disk!r}: holds FP8 NaN codes: corrupted "
                              "weights")
    scale_values = scale.float()
    if not bool(torch.isfinite(scale_values).all()) or \
            float(scale_values.max()) > MAX_WEIGHT_MAGNITUDE:
        raise CheckpointError(f"{file}: tensor {piece.scale!r}: scales not finite or beyond "
                              f"+-{MAX_WEIGHT_MAGNITUDE:g}: corrupted weights")


def _install(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
             device: torch.device) -> None:
    """Replace the meta parameters/buffers by the loaded tensors; rebuild RoPE tables."""
    from dsv4.model.network import rebuild_rope_tables

    for name, tensor in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = tensor
    rebuild_rope_tables(model, device)  # non-persistent: computed, not stored


# ---- keeping FP8/FP4 weights quantized --------------------------------------------------------
def _quantized_targets(p: CheckpointPlan) -> dict[str, dict[str, tuple[tuple, torch.dtype]]]:
    """Our tensors stored FP8/FP4 in the files -> the raw buffers to allocate for them."""
    out: dict[str, dict[str, tuple[tuple, torch.dtype]]] = {}
    for piece in p.pieces:
        if piece.encoding == "plain":
            continue
        weight, scale = p.files.infos[piece.disk], p.files.infos[piece.scale]
        if piece.expert is None:
            out[piece.target] = {"weight": (weight.shape, DTYPES[weight.dtype]),
                                 "scale": (scale.shape, DTYPES[scale.dtype])}
        else:
            n = p.shapes[piece.target][0]
            out[piece.target] = {"weight": ((n, *weight.shape), DTYPES[weight.dtype]),
                                 "scale": ((n, *scale.shape), DTYPES[scale.dtype]),
                                 "kind": ((), torch.uint8 if piece.encoding == "fp4"
                                          else torch.float8_e4m3fn)}
    return out


def _fill_raw(parts: dict[str, torch.Tensor], piece: Piece, files: SafetensorsFolder) -> None:
    weight, scale = files.get(piece.disk), files.get(piece.scale)
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.int8)
    if piece.expert is None:
        parts["weight"].copy_(weight)
        parts["scale"].copy_(scale)
    else:
        parts["weight"][piece.expert].copy_(weight)
        parts["scale"][piece.expert].copy_(scale)


def _install_quantized(model: torch.nn.Module, name: str, parts: dict[str, torch.Tensor],
                       p: CheckpointPlan, dtype: torch.dtype) -> None:
    module_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(module_name)
    if "kind" in parts:  # stacked routed experts: replace the parameter by a module
        kind = "fp4" if parts["kind"].dtype == torch.uint8 else "fp8"
        del parent._parameters[leaf]
        setattr(parent, leaf, quant.QuantizedExperts(parts["weight"], parts["scale"],
                                                     p.shapes[name], kind))
        return
    # `X.weight` of a linear layer: replace the layer X.
    owner_name, _, attr = module_name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    setattr(owner, attr, quant.FP8Linear(parts["weight"], parts["scale"],
                                         quant_sim=getattr(old, "quant_sim", False), dtype=dtype))


# =============================================================================================
# saving
# =============================================================================================
def dense_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with any kept-quantized modules dequantized back to our names."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, quant.FP8Linear):
            state.pop(f"{name}.qweight")
            state.pop(f"{name}.scale")
            state[f"{name}.weight"] = module.dequantized(module.dtype)
        elif isinstance(module, quant.QuantizedExperts):
            state.pop(f"{name}.weight")
            state.pop(f"{name}.scale")
            state[name] = torch.stack([module[e] for e in range(len(module))]).to(torch.bfloat16)
    return state


def save(model: Transformer, path: str | os.PathLike[str], format: str = "native",
         tokenizer: Tokenizer | str | os.PathLike[str] | None = None, *,
         dtype: str | torch.dtype | None = None, expert_dtype: str | None = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> Path:
    """Write `model` as a checkpoint folder in `format`; atomic (a temp folder beside `path`
    is renamed into place). Returns the folder.

    dtype: native/hf: the float dtype of the saved weights ("fp32", "bf16", "fp16"; default
      as in the model). official: "fp8" or "bf16" for the FP8-class weights (default
      `config.dtype`); the other tensors get their release dtypes (BF16, F32, I64).
    expert_dtype: official only: "fp4", "fp8" or "bf16" for the routed experts (default
      `config.expert_dtype`). The written config.json says what was written.
    """
    if format not in FORMATS:
        raise CheckpointError(f"format={format!r}: must be one of {list(FORMATS)}")
    cfg: ModelConfig = model.cfg
    state = dense_state_dict(model)
    if format == "official":
        cfg = _official_config(cfg, dtype, expert_dtype)
        tensors = _official_tensors(cfg, state)
    else:
        if expert_dtype is not None:
            raise CheckpointError("expert_dtype applies to the official format only")
        cast = _parse_dtype(dtype)
        if cast is not None and not cast.is_floating_point:
            raise CheckpointError(f"dtype={dtype!r}: not a float dtype")
        tensors = _cast_state(state, cast)
        if format == "hf":
            tensors = _hf_tensors(cfg, tensors)
    return _write_folder(Path(path), cfg, format, tensors, tokenizer, max_shard_bytes,
                         len(state), progress, dtype_label=_dtype_label(state, dtype))


def _dtype_label(state: dict[str, torch.Tensor], dtype: Any) -> str:
    cast = _parse_dtype(dtype) if not isinstance(dtype, str) or dtype in _WEIGHT_DTYPES else None
    if cast is None:
        floats = {t.dtype for t in state.values() if t.is_floating_point()}
        cast = torch.bfloat16 if floats == {torch.bfloat16} else torch.float32
        if torch.float16 in floats and len(floats) == 1:
            cast = torch.float16
    return str(cast).removeprefix("torch.")


def _official_config(cfg: ModelConfig, dtype: Any, expert_dtype: str | None) -> ModelConfig:
    weights = cfg.dtype if dtype is None else dtype
    experts = cfg.expert_dtype if expert_dtype is None else expert_dtype
    if weights not in ("fp8", "bf16"):
        raise CheckpointError(f"dtype={weights!r}: the official format stores weights as "
                              "'fp8' or 'bf16'")
    if experts not in ("fp4", "fp8", "bf16"):
        raise CheckpointError(f"expert_dtype={experts!r}: must be 'fp4', 'fp8' or 'bf16'")
    # The writer always emits E8M0 scales, so the config says so.
    return cfg.replace(dtype=weights, expert_dtype=experts, scale_fmt="ue8m0")


def _cast_state(state: dict[str, torch.Tensor],
                cast: torch.dtype | None) -> dict[str, torch.Tensor]:
    if cast is None:
        return state
    return {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}


def _official_tensors(cfg: ModelConfig,
                      state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> official tensors, quantized one at a time (lazily)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for piece in layout(cfg, shapes, "official"):
        yield from _encode_piece(piece, state, storage_class(piece.target))


def _encode_piece(piece: Piece, state: dict[str, torch.Tensor],
                  cls: str) -> Iterator[tuple[str, torch.Tensor]]:
    value = state[piece.target]
    value = value[piece.expert] if piece.expert is not None else value
    value = value.detach()
    if piece.encoding == "fp8":
        weight, scale = quant.quantize_fp8(value)
        yield piece.disk, weight
        yield piece.scale, scale
    elif piece.encoding == "fp4":
        weight, scale = quant.quantize_fp4(value)
        yield piece.disk, weight
        yield piece.scale, scale
    elif cls == "i64":
        yield piece.disk, value.to(torch.int64)
    elif cls == "f32":
        yield piece.disk, value.float()
    else:
        yield piece.disk, value.to(torch.bfloat16)


def _hf_tensors(cfg: ModelConfig,
                state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> the names save_pretrained writes (plain, unquantized)."""
    plain = cfg.replace(dtype="bf16", expert_dtype="bf16")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for piece in layout(plain, shapes, "hf"):
        value = state[piece.target]
        yield piece.disk, (value[piece.expert] if piece.expert is not None else value).detach()


def _write_folder(target: Path, cfg: ModelConfig, format: str,
                  tensors: Iterable[tuple[str, torch.Tensor]],
                  tokenizer: Any, max_shard_bytes: int, count: int, progress: bool,
                  dtype_label: str) -> Path:
    from tqdm import tqdm

    if target.exists() and not _replaceable(target):
        raise CheckpointError(f"{target}: exists and is not a checkpoint folder; refusing to "
                              "replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A save killed earlier (kill -9, a full disk) left its partial copy beside the target;
    # a ".old" copy is only safe to drop once the target it was replaced by exists.
    remove_temp_leftovers(target.parent, target.name,
                          (".tmp", ".old") if target.exists() else (".tmp",))
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as err:
        raise with_path(err, target) from None
    try:
        os.chmod(tmp, 0o755)
        if isinstance(tensors, dict):
            tensors = tensors.items()
        bar = tqdm(tensors, desc=f"saving {format}", unit="tensor", disable=not progress)
        write_sharded(tmp, bar, max_shard_bytes)
        _write_config(tmp, cfg, format, dtype_label)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".old"))
            os.replace(target, old / "ckpt")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as err:  # a full disk: name the checkpoint, not the temporary file
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(err.errno, err.strerror or str(err), str(target)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replaceable(target: Path) -> bool:
    """Only an empty folder or a checkpoint folder may be replaced by a save."""
    if not target.is_dir():
        return False
    entries = {p.name for p in target.iterdir()}
    return not entries or (CONFIG_NAME in entries and any(
        n.endswith(".safetensors") for n in entries))


def _write_config(folder: Path, cfg: ModelConfig, format: str, dtype_label: str) -> None:
    if format == "native":
        write_json_atomic(folder / CONFIG_NAME, cfg.to_dict())
    elif format == "official":
        cfg.save(folder, dialect="official")
    else:
        data = cfg.replace(dtype="bf16", expert_dtype="bf16").to_hf_dict()
        data["dtype"] = dtype_label  # what from_pretrained(dtype="auto") uses
        write_json_atomic(folder / CONFIG_NAME, data)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    from dsv4.text.tokenizer import Tokenizer

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(tokenizer)
    tokenizer.save(folder / TOKENIZER_NAME)


# =============================================================================================
# describing and converting
# =============================================================================================
def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `dsv4 info CHECKPOINT` shows, after the full header/plan check (no tensor data
    read): layout, files, on-disk dtypes, parameter counts and the config."""
    p = plan(path)
    dtypes: dict[str, dict[str, int]] = {}
    for info in p.files.infos.values():
        entry = dtypes.setdefault(info.dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += info.nbytes
    params = {"total": 0, "main": 0, "mtp": 0, "buffers": 0}
    for name, shape in p.shapes.items():
        n = 1
        for d in shape:
            n *= d
        if not p.dtypes[name].is_floating_point:
            params["buffers"] += n
            continue
        params["total"] += n
        params["mtp" if name.startswith("mtp.") else "main"] += n
    return {
        "path": str(path),
        "checkpoint": str(p.folder),
        "format": p.layout_name,
        "names": p.format,  # hf-runtime: transformers parameter names rather than saved names
        "files": [f.name for f in p.files.files],
        "file_bytes": sum(f.stat().st_size for f in p.files.files),
        "tensors": len(p.files.infos),
        "dtypes": dict(sorted(dtypes.items())),
        "weights": {"dtype": p.config.dtype, "expert_dtype": p.config.expert_dtype},
        "params": params,
        "notes": p.notes,
        "model_config": p.config.to_dict(),
    }


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, *,
            dtype: str | None = None, expert_dtype: str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> Path:
    """Convert a checkpoint to layout `to` (native, official, hf). The tokenizer.json comes
    along. Official FP4 experts -> official FP8 experts is done tensor by tensor (the lossless
    recast of `quant.py`); everything else goes through a model in memory."""
    if to not in FORMATS:
        raise CheckpointError(f"to={to!r}: must be one of {list(FORMATS)}")
    source = plan(src)
    tokenizer = find_tokenizer(source.folder)
    if (to == "official" and source.format == "official" and expert_dtype == "fp8"
            and source.config.expert_dtype == "fp4" and dtype in (None, source.config.dtype)):
        return recast_fp4_to_fp8(source, Path(dst), tokenizer, max_shard_bytes, progress)
    load_dtype = None
    if to != "official" and dtype is not None:
        load_dtype = dtype
    model = load_plan(source, dtype=load_dtype, progress=progress)
    return save(model, dst, format=to, tokenizer=tokenizer, dtype=dtype,
                expert_dtype=expert_dtype, max_shard_bytes=max_shard_bytes, progress=progress)


def recast_fp4_to_fp8(source: CheckpointPlan, dst: Path, tokenizer: Path | None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = False) -> Path:
    """Official checkpoint with FP4 routed experts -> the same with FP8 experts and 128x128
    E8M0 scales, exactly (`quant.fp4_to_fp8` refuses any rounding); all other tensors are
    copied byte for byte."""
    cfg = source.config.replace(expert_dtype="fp8")
    fp4 = {p.disk: p for p in source.pieces if p.encoding == "fp4"}
    scales = {p.scale for p in fp4.values()}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(source.files.infos, key=lambda n: (source.files.infos[n].file, n)):
            if name in scales:
                continue
            if name in fp4:
                piece = fp4[name]
                try:
                    weight, scale = quant.fp4_to_fp8(source.files.get(name),
                                                     source.files.get(piece.scale),
                                                     piece.shape[-1])
                except ValueError as err:
                    raise CheckpointError(f"{source.files.infos[name].file}: tensor {name!r}: "
                                          f"{err}") from None
                yield name, weight
                yield piece.scale, scale
            else:
                yield name, source.files.get(name).clone()

    return _write_folder(dst, cfg, "official", tensors(), tokenizer, max_shard_bytes,
                         len(source.files.infos), progress, dtype_label="bfloat16")
