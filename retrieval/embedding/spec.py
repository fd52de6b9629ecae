"""What a model is, without loading it: the user's request (ModelSpec) and what an index
records (ModelSignature); checkpoint files, default weights and the user cache folder.

Nothing here imports torch; open_clip only where an architecture name must be checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from retrieval.core.errors import ModelLoadError, ModelMismatchError

DEFAULT_ARCH = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM = "random"  # seeded random weights: for tests and speed benchmarks, meaningless results
CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. `pretrained` is a tag, a checkpoint file or folder, or 'random'."""

    arch: str = DEFAULT_ARCH
    pretrained: str = DEFAULT_PRETRAINED
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 | int8 (see devices.resolve_precision)
    seed: int = 0  # only for pretrained='random'
    backend: str = "auto"  # auto | torch | onnx | openvino: what runs the image tower (devices.py)

    def weights_id(self) -> str:
        """Identity of the weights, cheap to compute: the tag, or the checkpoint's sha256."""
        if self.pretrained == RANDOM:
            return f"random:seed={self.seed}"
        path = checkpoint_path(self.pretrained)
        if path is not None:
            return "sha256:" + file_sha256(path)
        return self.pretrained

    def arch_name(self) -> str:
        return register_config(self.arch)


@dataclass(frozen=True)
class ModelSignature:
    """What an index records about the model that built it; a query must use the same."""

    arch: str
    weights_id: str
    pretrained: str  # how to load it again: tag, absolute checkpoint path, or 'random'
    dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # The learned temperature exp(logit_scale), and the bias of sigmoid-loss models (SigLIP; None
    # for CLIP), so that label probabilities need no model load. Not part of the identity: they
    # follow from the weights, and indexes written before they were recorded lack them (None).
    logit_scale: float | None = None
    logit_bias: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSignature:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        return f"{self.arch} with weights {self.weights_id}"

    def key(self) -> str:
        """A short stable id of the model's identity, for file names of derived artefacts.
        Only the identity fields, listed explicitly: new fields must not rename existing files."""
        identity = [self.arch, self.weights_id, self.dim, self.preprocess]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def spec(self, device: str = "auto", precision: str = "auto", backend: str = "auto") -> ModelSpec:
        return ModelSpec(self.arch, self.pretrained, device, precision, self.seed, backend)

    def _identity(self) -> tuple[str, str, int, str]:
        return (self.arch, self.weights_id, self.dim, _canon(self.preprocess))

    def matches(self, other: ModelSignature) -> bool:
        """Same arch, weights, dimension and preprocessing (where the weights file lies does not matter)."""
        return self._identity() == other._identity()

    def check_compatible(self, other: ModelSignature, where: str) -> None:
        if not self.matches(other):
            raise ModelMismatchError(
                f"{where} was built with {self.describe()} (dim {self.dim}), not {other.describe()} "
                f"(dim {other.dim}); use the index's own model, or rebuild it with "
                "'clipdex index --reindex'"
            )


def check_spec_matches(recorded: ModelSignature, spec: ModelSpec, where: str) -> None:
    """Cheap check before any model is loaded: architecture and weights identity."""
    if (recorded.arch, recorded.weights_id) != (spec.arch_name(), spec.weights_id()):
        raise ModelMismatchError(
            f"{where} was built with {recorded.describe()}, not {spec.arch_name()} with weights "
            f"{spec.weights_id()}; use the index's own model (omit --model/--pretrained), or rebuild it "
            "with 'clipdex index --reindex'"
        )


def default_pretrained(arch: str) -> str:
    """The weights to use for `arch` when none are named: ViT-B-32 keeps the project's default,
    any other architecture gets the first of open_clip's pretrained tags for it."""
    if arch == DEFAULT_ARCH:
        return DEFAULT_PRETRAINED
    import open_clip  # seconds (it imports torch): only when an architecture is looked up

    check_arch(arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not tags:
        raise ModelLoadError(
            f"open_clip has no pretrained weights for {arch}: pass --pretrained FILE (a checkpoint) "
            "or --pretrained 'random'"
        )
    return tags[0]


def check_arch(arch: str) -> None:
    """A one-line error for an architecture open_clip does not know (a .json config path is known)."""
    import open_clip  # seconds (it imports torch): only when an architecture is looked up

    if arch.endswith(".json") and os.path.isfile(arch):
        return
    open_clip.add_model_config(CONFIG_DIR)  # the bundled configs (clipdex-tiny) count as known
    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model architecture '{arch}': see 'python -c \"import open_clip; "
            "print(open_clip.list_models())\"', or pass a config file path"
        )


def _canon(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True)


def register_config(arch: str) -> str:
    """Make the bundled configs (and `arch` given as a .json path) known to open_clip."""
    if arch.endswith(".json") and os.path.isfile(arch):
        import open_clip  # seconds (it imports torch): only when an architecture is looked up

        open_clip.add_model_config(arch)
        return Path(arch).stem
    return arch


def checkpoint_path(pretrained: str) -> Path | None:
    """The checkpoint file `pretrained` names, if it names a local file or folder."""
    p = Path(pretrained).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        for name in CHECKPOINT_NAMES:
            if (p / name).is_file():
                return (p / name).resolve()
        found = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.pt*"))
        if found:
            return found[0].resolve()
        raise ModelLoadError(f"no checkpoint file (*.safetensors, *.bin, *.pt) in folder {p}")
    if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        raise ModelLoadError(f"checkpoint not found: {p}")
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a checkpoint, cached by (path, size, mtime) since big files take seconds."""
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_dir() / "checkpoint-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache that cannot be written only costs time
    return digest


def cache_dir() -> Path:
    env = os.environ.get("CLIPDEX_CACHE")
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("clipdex", appauthor=False))


def loadable_pretrained(pretrained: str) -> str:
    path = checkpoint_path(pretrained) if pretrained != RANDOM else None
    return str(path) if path is not None else pretrained
