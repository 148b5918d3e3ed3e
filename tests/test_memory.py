"""Memory of loading and of writing a checkpoint of a few hundred MB, measured in a fresh process.

Increase = peak RSS (VmHWM) at the end minus the RSS right after the imports: an upper bound
on what loading or writing added.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moerun.model.config import ModelConfig

# ~580 MB on disk, 80% of it packed experts: enough that a second copy, or all experts
# dequantized to bf16 at once (~400 MB), would break the bounds below.
BIG = ModelConfig(
    num_hidden_layers=4, num_experts=64, experts_per_token=4, vocab_size=32000, hidden_size=1024,
    intermediate_size=1024, head_dim=64, num_attention_heads=16, num_key_value_heads=4,
)  # fmt: skip

_PRELUDE = """
import json, resource, sys
import torch
from moerun.model.checkpoint import load_checkpoint
from moerun.model.config import ModelConfig
from moerun.model.gpt_oss import Transformer
from moerun.model.synth import synth

def rss_mb():  # current resident set, from /proc
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def peak_mb():  # VmHWM, not ru_maxrss: that one inherits the forking parent's peak
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

# warm up torch's one-time allocations (module machinery, kernels, thread pools) on a toy model
# so they are not billed to the checkpoint
toy = ModelConfig(num_hidden_layers=1, num_experts=4, experts_per_token=2, vocab_size=64,
                  hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                  num_key_value_heads=1)
with torch.device("meta"):
    Transformer(toy)
with torch.inference_mode():
    Transformer(toy).to(torch.bfloat16)(torch.arange(8))
base = rss_mb()
"""

_LOAD = """
model = Transformer.from_checkpoint(load_checkpoint(sys.argv[1]), torch.bfloat16)
with torch.inference_mode():
    for t in model.state_dict().values():  # fault every page in: read one byte per 1 KiB
        t.reshape(-1).view(torch.uint8)[::1024].sum()
    loaded = peak_mb()
    model(torch.arange(64) * 37)  # 64 tokens route to most of the 64 experts
stored = {n: t.dtype for n, t in model.state_dict().items() if "_weight." in n}  # mlp1/2 packed
print(json.dumps({"increase_mb": loaded - base, "forward_mb": peak_mb() - loaded,
                  "dtypes": sorted({str(d) for d in stored.values()})}))
"""

_SYNTH = """
cfg = ModelConfig(**json.loads(sys.argv[2]))
synth(cfg, sys.argv[1], layout="original", seed=3)
print(json.dumps({"increase_mb": peak_mb() - base}))
"""


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + script, *args],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("big")
    fields = {k: v for k, v in BIG.__dict__.items() if k != "layer_types"}
    return folder, _run(_SYNTH, str(folder), json.dumps(fields))


def test_synth_streams_tensor_by_tensor(big_checkpoint):
    folder, synth_stats = big_checkpoint
    size = _disk_mb(folder)
    assert size > 400
    # the largest single tensor is 67 MB; writing must not hold the checkpoint in memory
    assert synth_stats["increase_mb"] < 0.4 * size, (synth_stats, size)


def test_loading_keeps_one_copy_and_experts_packed(big_checkpoint):
    folder, _ = big_checkpoint
    size = _disk_mb(folder)
    stats = _run(_LOAD, str(folder))
    assert stats["dtypes"] == ["torch.uint8"]
    assert stats["increase_mb"] <= 1.15 * size, (stats, size)
    # a forward dequantizes one expert at a time (measured ~95 MB of transients, most of it the
    # BLAS repacking the unembedding); all 64 experts of a layer in bf16 would add ~400 MB
    assert stats["forward_mb"] <= 0.25 * size, (stats, size)
