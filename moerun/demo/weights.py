"""The packaged demo weights and the real-format checkpoint they expand to.

The demo model uses ~2k of the 201,088 token ids; full embedding and unembedding tables would be
~100 MB of zeros. The package keeps only the used rows (`used_ids`) next to every other tensor
in its checkpoint dtype (experts packed MXFP4), a few MB. On first use `demo_path()` writes the
Hugging Face layout into a cache folder named by the weights' hash, with unused rows zero: an
unused token embeds to zero, and its logit is 0, far below the trained tokens' (the training
softmax counted every unused token at logit 0, so the model learned to outscore them).
"""

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from moerun.model.checkpoint import expected_tensors
from moerun.model.config import PRESETS, ModelConfig
from moerun.model.safetensors_io import DTYPE_NAMES, SafetensorsFile, TensorSpec, write_safetensors
from moerun.model.synth import write_checkpoint

# the tiny preset (hidden 128, 8 experts top-2, full vocabulary) with four layers
DEMO_CONFIG = PRESETS["tiny"].replace(num_hidden_layers=4)
WEIGHTS, CONFIG = "weights.safetensors", "config.json"
ROW_TENSORS = ("embedding.weight", "unembedding.weight")  # stored as the used rows only


def packaged_dir() -> Path:
    return Path(str(resources.files("moerun") / "data" / "demo"))


def save_compact(
    out: Path, cfg: ModelConfig, used_ids: torch.Tensor, tensors: dict[str, torch.Tensor]
) -> int:
    """Write the package form: `tensors` holds every tensor of the HF layout under our names,
    except that the embedding and unembedding hold only the rows of `used_ids`. Returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    expected = expected_tensors(cfg, "hf")
    values = {"used_ids": used_ids.to(torch.int32), **tensors}
    specs = [TensorSpec("used_ids", "I32", (len(used_ids),))]
    for ours, spec in expected.items():
        shape = (len(used_ids), cfg.hidden_size) if ours in ROW_TENSORS else spec.shape
        specs.append(TensorSpec(ours, spec.dtype, shape))
    for spec in specs:
        got = values[spec.name]
        assert DTYPE_NAMES[got.dtype] == spec.dtype and tuple(got.shape) == spec.shape, spec
    (out / CONFIG).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    return write_safetensors(out / WEIGHTS, specs, lambda s: values[s.name])


def expand(src: Path, out: Path) -> Path:
    """The package form in `src` -> a Hugging Face layout checkpoint in `out`."""
    cfg = ModelConfig.from_hf(json.loads((src / CONFIG).read_text()))
    packed = SafetensorsFile(src / WEIGHTS)
    used = packed.tensor("used_ids").long()
    tensors = {name: packed.tensor(name) for name in packed.names() if name != "used_ids"}
    for name in ROW_TENSORS:
        full = torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16)
        full[used] = tensors[name]
        tensors[name] = full
    return write_checkpoint(cfg, out, tensors, layout="hf")


def cache_root() -> Path:
    """$MOERUN_CACHE, else $XDG_CACHE_HOME/moerun, else ~/.cache/moerun."""
    if os.environ.get("MOERUN_CACHE"):
        return Path(os.environ["MOERUN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moerun"


def demo_path(src: Path | None = None) -> Path:
    """The demo checkpoint folder, expanded from the package on first use. The folder is named
    by the weights' hash and appears whole (written aside, then renamed), so a retrained model
    gets a new folder and two processes starting at once never read half a checkpoint."""
    src = src or packaged_dir()
    digest = hashlib.sha256((src / WEIGHTS).read_bytes()).hexdigest()[:16]
    final = cache_root() / f"demo-{digest}"
    if (final / CONFIG).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=final.parent))
    try:
        expand(src, tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / CONFIG).exists():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(model: str) -> str:
    """ "demo" (unless a folder has that name) -> the demo checkpoint's folder; else as given."""
    return str(demo_path()) if model == "demo" and not Path(model).exists() else model
