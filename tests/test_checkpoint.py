"""Checkpoint loading (spec §3.2, §3.3): both layouts, zero-copy, interop with the `safetensors`
library, sharding, and one-line errors for every kind of damaged checkpoint."""

import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moerun.cli import main
from moerun.errors import CheckpointError, ConfigError
from moerun.model.checkpoint import INDEX_FILE, expected_tensors, load_checkpoint
from moerun.model.gpt_oss import Transformer
from moerun.model.safetensors_io import SafetensorsFile, TensorSpec

from conftest import SMALL

SHARD_BYTES = 70_000  # SMALL's largest tensor is 65,536 B: gives several shards
HF_SHARD = "model-00000-of-00000.safetensors"  # a single HF shard: index 0 of last index 0


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _header(path: Path) -> dict:
    """The safetensors JSON header, parsed by hand (independent of both readers)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


# ---- layouts ------------------------------------------------------------------------------


def test_layout_detection(make_checkpoint, tmp_path: Path) -> None:
    hf = make_checkpoint(SMALL, "hf")
    orig = make_checkpoint(SMALL, "original")
    both = make_checkpoint(SMALL, "both")
    only_original = tmp_path / "m"
    shutil.copytree(both / "original", only_original / "original")
    cases = [
        (hf, hf, "hf"),
        (orig, orig, "original"),
        (both, both, "hf"),  # the Hub's layout: HF at the root wins
        (both / "original", both / "original", "original"),
        (only_original, only_original / "original", "original"),
    ]
    for path, directory, layout in cases:
        ckpt = load_checkpoint(path)
        assert (ckpt.directory, ckpt.layout) == (directory, layout), path
        assert ckpt.config == SMALL
        assert ckpt.tensors.keys() == expected_tensors(SMALL, layout).keys()


def test_layouts_hold_the_same_model(make_checkpoint) -> None:
    both = make_checkpoint(SMALL, "both")
    hf, orig = load_checkpoint(both), load_checkpoint(both / "original")
    q, kv = SMALL.q_size, SMALL.kv_size
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    for n in range(SMALL.num_hidden_layers):
        for part in ("weight", "bias"):
            fused = orig.tensors[f"block.{n}.attn.qkv.{part}"]
            assert fused.shape[0] == q + 2 * kv
            for p, sl in rows.items():
                assert torch.equal(hf.tensors[f"block.{n}.attn.{p}.{part}"], fused[sl])
    shared = hf.tensors.keys() & orig.tensors.keys()
    assert len(shared) == len(orig.tensors) - 2 * SMALL.num_hidden_layers
    for name in shared:
        # byte-identical (view as bytes so even NaN payloads would have to match)
        a, b = hf.tensors[name], orig.tensors[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_expert_tensors_are_packed_uint8(make_checkpoint, layout: str) -> None:
    ckpt = load_checkpoint(make_checkpoint(SMALL, layout))
    E, D, I = SMALL.num_experts, SMALL.hidden_size, SMALL.intermediate_size
    for n in range(SMALL.num_hidden_layers):
        shapes = {
            "mlp1_weight.blocks": (E, 2 * I, D // 32, 16),
            "mlp1_weight.scales": (E, 2 * I, D // 32),
            "mlp2_weight.blocks": (E, D, I // 32, 16),
            "mlp2_weight.scales": (E, D, I // 32),
        }
        for leaf, shape in shapes.items():
            t = ckpt.tensors[f"block.{n}.mlp.{leaf}"]
            assert t.dtype == torch.uint8 and tuple(t.shape) == shape, leaf
        assert ckpt.tensors[f"block.{n}.mlp.mlp1_bias"].dtype == torch.bfloat16
    assert ckpt.tensors["embedding.weight"].dtype == torch.bfloat16


# ---- zero copy ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_tensors_are_views_of_the_file(make_checkpoint, layout: str) -> None:
    # a view of one mapping of the file: addresses differ exactly by the header's offsets
    ckpt = load_checkpoint(make_checkpoint(SMALL, layout))
    (path,) = ckpt.directory.glob("*.safetensors")
    header = _header(path)
    ours = {spec.name: name for name, spec in expected_tensors(SMALL, layout).items()}
    base = {
        ckpt.tensors[ours[name]].data_ptr() - info["data_offsets"][0]
        for name, info in header.items()
        if name != "__metadata__"
    }
    assert len(base) == 1


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_model_adopts_checkpoint_storage(make_checkpoint, layout: str) -> None:
    ckpt = load_checkpoint(make_checkpoint(SMALL, layout))
    model = Transformer.from_checkpoint(ckpt, torch.bfloat16, mmap_weights=True)
    proj = "qkv" if layout == "original" else "q"
    pairs = {
        "block.0.mlp.mlp1_weight.blocks": model.block[0].mlp.mlp1_weight.blocks,
        "block.0.mlp.mlp1_weight.scales": model.block[0].mlp.mlp1_weight.scales,
        "block.1.mlp.mlp2_weight.blocks": model.block[1].mlp.mlp2_weight.blocks,
        "embedding.weight": model.embedding.weight,
        "unembedding.weight": model.unembedding.weight,
        f"block.0.attn.{proj}.weight": getattr(model.block[0].attn, proj).weight,
        "block.1.mlp.mlp1_bias": model.block[1].mlp.mlp1_bias,
    }
    for name, held in pairs.items():
        assert held.data_ptr() == ckpt.tensors[name].data_ptr(), name
        assert held.untyped_storage().data_ptr() == ckpt.tensors[name].untyped_storage().data_ptr()
    # the reference keeps norm scales in fp32 (spec §2.2): that one is a converted copy
    assert model.norm.scale.dtype == torch.float32
    assert torch.equal(model.norm.scale, ckpt.tensors["norm.scale"].float())


def test_by_default_weights_are_copied_but_the_embedding(make_checkpoint) -> None:
    """On a CPU the weights are copied into process memory (faster to stream than the mmap's
    pages), the same values; the embedding table stays mapped (one row read per token). The HF
    layout's q, k, v become one [q; k; v] projection, like the original layout's."""
    ckpt = load_checkpoint(make_checkpoint(SMALL, "hf"))
    model = Transformer.from_checkpoint(ckpt, torch.bfloat16)
    held = dict(model.named_buffers())
    for n in range(SMALL.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = [ckpt.tensors[f"block.{n}.attn.{p}.{kind}"] for p in "qkv"]
            assert torch.equal(held[f"block.{n}.attn.qkv.{kind}"], torch.cat(parts))
    for name, t in ckpt.tensors.items():
        if name not in held:
            assert ".attn.q." in name or ".attn.k." in name or ".attn.v." in name, name
        elif name == "embedding.weight":
            assert held[name].data_ptr() == t.data_ptr()
        elif held[name].dtype == t.dtype:  # norm scales are fp32 copies anyway
            assert held[name].data_ptr() != t.data_ptr(), name
            assert torch.equal(held[name], t), name


def test_float32_model_still_shares_experts(make_checkpoint) -> None:
    ckpt = load_checkpoint(make_checkpoint(SMALL, "original"))
    model = Transformer.from_checkpoint(ckpt, torch.float32, mmap_weights=True)
    blocks = model.block[0].mlp.mlp1_weight.blocks
    assert blocks.dtype == torch.uint8
    assert blocks.data_ptr() == ckpt.tensors["block.0.mlp.mlp1_weight.blocks"].data_ptr()
    assert model.embedding.weight.dtype == torch.float32
    assert torch.equal(model.embedding.weight, ckpt.tensors["embedding.weight"].float())


# ---- interop and sharding -----------------------------------------------------------------


def test_safetensors_library_reads_our_files(make_checkpoint) -> None:
    both = make_checkpoint(SMALL, "both")
    sharded = make_checkpoint(SMALL, "hf", shard_bytes=SHARD_BYTES)
    files = [*both.glob("*.safetensors"), *(both / "original").glob("*.safetensors")]
    files += sharded.glob("*.safetensors")
    assert len(files) >= 5
    for path in files:
        ours = SafetensorsFile(path)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses other formats
            assert set(f.keys()) == set(ours.names())
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                ref = f.get_tensor(name)
                got = ours.tensor(name)
                assert ref.dtype == got.dtype and torch.equal(ref, got), (path.name, name)


def test_we_read_safetensors_library_files(make_checkpoint, tmp_path: Path) -> None:
    src = make_checkpoint(SMALL, "hf")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(dst / HF_SHARD)
    save_file(tensors, dst / HF_SHARD, metadata={"format": "pt"})  # its own order and header
    _same_tensors(load_checkpoint(dst).tensors, load_checkpoint(src).tensors)


def specs_by_name(specs: dict[str, TensorSpec]) -> dict[str, int]:
    """Checkpoint tensor name -> bytes."""
    return {s.name: s.nbytes for s in specs.values()}


def test_sharded_checkpoint(make_checkpoint) -> None:
    path = make_checkpoint(SMALL, "hf", shard_bytes=SHARD_BYTES)
    specs = expected_tensors(SMALL, "hf")
    index = json.loads((path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == {s.name for s in specs.values()}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs.values())

    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert set(weight_map.values()) == set(shards)
    assert len(shards) >= 3
    assert all(s.nbytes <= SHARD_BYTES for s in specs.values())
    # HF convention (spec §1.3): -of- names the last 0-based index, not the count
    last = len(shards) - 1
    assert shards == [f"model-{i:05d}-of-{last:05d}.safetensors" for i in range(len(shards))]
    for shard in shards:
        header = _header(path / shard)
        inside = {k for k in header if k != "__metadata__"}
        assert inside == {k for k, v in weight_map.items() if v == shard}, shard
        assert sum(specs_by_name(specs)[k] for k in inside) <= SHARD_BYTES

    sharded = load_checkpoint(path)
    assert sharded.layout == "hf" and sharded.config == SMALL
    _same_tensors(sharded.tensors, load_checkpoint(make_checkpoint(SMALL, "hf")).tensors)


def test_single_hf_shard_follows_naming(make_checkpoint) -> None:
    path = make_checkpoint(SMALL, "hf")
    assert sorted(p.name for p in path.glob("*.safetensors")) == [HF_SHARD]
    index = json.loads((path / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {HF_SHARD}


# ---- damaged checkpoints ------------------------------------------------------------------


def _with_length(header: bytes) -> bytes:
    """A safetensors-looking file: u64 little-endian header length, then the header."""
    return struct.pack("<Q", len(header)) + header


def _copy(make_checkpoint: Callable[..., Path], tmp_path: Path, layout: str, **kw: int) -> Path:
    """A private, writable copy of the cached SMALL checkpoint, to damage."""
    dst = tmp_path / f"bad-{layout}"
    shutil.copytree(make_checkpoint(SMALL, layout, **kw), dst)
    return dst


def _shard(path: Path) -> Path:
    (shard,) = path.glob("*.safetensors")
    return shard


def _rewrite(shard: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Rewrite a shard with the `safetensors` library after `edit` changed its tensor dict."""
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _drop_tensor(path: Path, layout: str) -> str:
    name = "model.layers.1.self_attn.sinks" if layout == "hf" else "block.1.attn.sinks"
    _rewrite(_shard(path), lambda t: t.pop(name))
    return name


def _truncate(path: Path) -> str:
    """Cut the last 7 bytes off the only shard; returns the tensor whose data they held."""
    shard = _shard(path)
    header = _header(shard)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    return last


def _set_quant(path: Path, quant: dict | None) -> None:
    cfg = json.loads((path / "config.json").read_text())
    if quant is None:
        del cfg["quantization_config"]
    else:
        cfg["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_missing_tensor(make_checkpoint, tmp_path: Path, layout: str) -> None:
    path = _copy(make_checkpoint, tmp_path, layout)
    name = _drop_tensor(path, layout)
    with pytest.raises(CheckpointError, match=re.escape(name) + " is missing"):
        load_checkpoint(path)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_truncated_file(make_checkpoint, tmp_path: Path, layout: str) -> None:
    path = _copy(make_checkpoint, tmp_path, layout)
    last = _truncate(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "truncated" in msg and last in msg and _shard(path).name in msg


def test_wrong_shape(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint, tmp_path, "hf")
    name = "model.layers.0.self_attn.sinks"
    heads = SMALL.num_attention_heads

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.zeros(heads + 1, dtype=torch.bfloat16)

    _rewrite(_shard(path), edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert name in msg and f"[{heads + 1}]" in msg and f"[{heads}]" in msg


def test_wrong_dtype(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint, tmp_path, "original")
    name = "block.0.mlp.mlp2_weight.scales"

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name].to(torch.int8)  # same shape and size, wrong dtype

    _rewrite(_shard(path), edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert name in msg and "I8" in msg and "U8" in msg


def test_unexpected_extra_tensor(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint, tmp_path, "hf")
    extra = "model.layers.2.self_attn.sinks"  # a layer SMALL does not have

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[extra] = torch.zeros(SMALL.num_attention_heads, dtype=torch.bfloat16)

    _rewrite(_shard(path), edit)
    with pytest.raises(CheckpointError, match=re.escape(extra)):
        load_checkpoint(path)


def test_tensor_in_two_shards(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint, tmp_path, "hf", shard_bytes=SHARD_BYTES)
    first, second = sorted(path.glob("*.safetensors"))[:2]
    dup = next(iter(load_file(first)))
    tensors = load_file(second)
    tensors[dup] = load_file(first)[dup]
    save_file(tensors, second, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(dup)):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("quant", "words"),
    [
        ({"quant_method": "awq", "bits": 4}, ["quant_method", "awq"]),
        ({"modules_to_not_convert": []}, ["quant_method", "None"]),
        (None, ["quantization_config"]),
    ],
)
def test_unsupported_quantization(
    make_checkpoint, tmp_path: Path, quant: dict | None, words: list[str]
) -> None:
    path = _copy(make_checkpoint, tmp_path, "hf")
    _set_quant(path, quant)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path)
    for word in words:
        assert word in str(info.value)
    assert "config.json" in str(info.value)


def test_missing_shard(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint, tmp_path, "hf", shard_bytes=SHARD_BYTES)
    gone = sorted(path.glob("*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=re.escape(gone.name)):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a safetensors file at all\n" * 20,
        b"",
        _with_length(b"{oops"),  # JSON that does not parse
        _with_length(b"[1,2,3]"),  # JSON, but not an object
        _with_length(b'{"a": 5}'),  # a tensor entry that is not an object
        _with_length(b'{"a": {"dtype": "BF16", "shape": [2]}}') + b"\0" * 4,  # no data_offsets
    ],
    ids=["text", "empty", "bad-json", "json-list", "entry-not-object", "no-data_offsets"],
)
def test_garbage_file(make_checkpoint, tmp_path: Path, content: bytes) -> None:
    path = _copy(make_checkpoint, tmp_path, "hf")
    _shard(path).write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(HF_SHARD)):
        load_checkpoint(path)


def test_empty_and_weightless_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf()))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no-such-folder"):
        load_checkpoint(tmp_path / "no-such-folder")


# ---- the CLI turns all of these into one line on stderr -----------------------------------


def _run_cli(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run several `moerun` processes at once: each pays the ~1 s torch import."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "moerun.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    done = []
    for argv, p in zip(argvs, procs, strict=True):
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return done


def _assert_one_line_error(rc: int, out: str, err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("moerun score: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert out == ""


def test_cli_reports_damaged_checkpoints(make_checkpoint, tmp_path: Path) -> None:
    # real processes: an uncaught exception would print a traceback and exit 1
    missing = _copy(make_checkpoint, tmp_path / "a", "hf")
    dropped = _drop_tensor(missing, "hf")
    truncated = _copy(make_checkpoint, tmp_path / "b", "original")
    last = _truncate(truncated)
    awq = _copy(make_checkpoint, tmp_path / "c", "hf")
    _set_quant(awq, {"quant_method": "awq"})
    cases = {
        missing: (dropped, "missing"),
        truncated: ("truncated", last),
        awq: ("quant_method", "awq"),
    }
    argvs = [["score", "--model", str(p), "--tokens", "1,2,3"] for p in cases]
    for r, words in zip(_run_cli(argvs), cases.values(), strict=True):
        _assert_one_line_error(r.returncode, r.stdout, r.stderr, *words)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in-process (no torch import per call); an escaping exception fails the test."""
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_reports_corrupt_header(make_checkpoint, tmp_path: Path, capsys) -> None:
    # a header that is JSON but not an object: a damaged file, which must not crash the CLI
    garbage = _copy(make_checkpoint, tmp_path, "hf")
    _shard(garbage).write_bytes(_with_length(b"[1,2,3]"))
    argv = ["score", "--model", str(garbage), "--tokens", "1,2,3"]
    _assert_one_line_error(*_main(argv, capsys), HF_SHARD)


def test_cli_argument_errors(make_checkpoint, capsys) -> None:
    path = str(make_checkpoint(SMALL, "hf"))
    vocab = SMALL.vocab_size
    score = ["score", "--model", path, "--tokens"]
    _assert_one_line_error(*_main([*score, "1,x"], capsys), "--tokens", "1,x")
    _assert_one_line_error(*_main([*score, f"1,{vocab}"], capsys), f"token id {vocab}")
    _assert_one_line_error(*_main([*score, "7"], capsys), "at least 2 tokens")
    # the same model scores a valid sequence: the errors above are about the tokens
    rc, out, err = _main([*score, f"0,{vocab - 1}", "--json"], capsys)
    assert (rc, err) == (0, "")
    assert json.loads(out)["tokens"] == [0, vocab - 1]
