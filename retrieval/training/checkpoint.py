"""Files a training run writes: the open_clip checkpoint (a plain state_dict, what
`open_clip.create_model(arch, pretrained=PATH)` and `clipdex index --pretrained PATH` load) and
the resume file beside it (model, optimiser, schedule, step, random states). Both are written to
a temporary file and renamed into place: a kill leaves the previous file whole, never half of one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.core.errors import ClipdexError

RESUME_SUFFIX = ".resume"


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + RESUME_SUFFIX)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: torch.nn.Module, out: Path) -> None:
    """The open_clip checkpoint: the model's state_dict, float32, on the CPU."""
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
        for k, v in model.state_dict().items()
    }
    atomic_save(state, out)


def random_states() -> dict[str, Any]:
    return {
        "torch": torch.random.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_random_states(states: dict[str, Any]) -> None:
    torch.random.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def load_resume(path: Path) -> dict[str, Any]:
    try:
        # weights_only=False: the file holds numpy and Python random states. It is the file this
        # command wrote itself beside --out, not a download.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ClipdexError(
            f"cannot read the resume file {path} ({type(exc).__name__}); delete it to start over"
        ) from None
