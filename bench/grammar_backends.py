"""llguidance against xgrammar on the harmony vocabulary (issue 15), one thread.

For each of the 58 real-world schemas of tests/data/structured_schemas.json: compile time in
llguidance, xgrammar (masks precomputed at compile, its default) and xgrammar with dynamic
compilation (masks built on first use); a schema that fails is refused, with the error, and
xgrammar's warnings about keywords it ignores are kept. Then, for the schemas all compile, a
lockstep walk: every matcher computes its mask and consumes the same token: the schema's example
(compact JSON, then <|endoftext|>), or, from the first example token one rejects, the lowest id all
allow; at most --steps tokens. The first mask (right after compile) is reported apart. All compile
the plain JSON schema to the same language: compact separators, no whitespace, extra properties
allowed (xgrammar strict_mode=False, as JSON Schema and llguidance read a schema). moerun's own
path (check_grammar of turn_grammar) is timed apart. xgrammar is not a dependency of moerun;
install it (and its native dependency apache-tvm-ffi) for the run only:

  .venv/bin/pip install --no-deps --target /tmp/xgpkgs xgrammar-0.2.9-*.whl apache_tvm_ffi-*.whl
  OMP_NUM_THREADS=1 PYTHONPATH=/tmp/xgpkgs .venv/bin/python bench/grammar_backends.py
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import llguidance as llg
import numpy as np
import torch

from moerun.harmony import structured
from moerun.harmony.tokenizer import VOCAB_SIZE, load_tokenizer

try:
    import xgrammar as xgr
except ImportError as error:
    print(f"xgrammar is not importable ({error}); see this file's docstring", file=sys.stderr)
    sys.exit(2)

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "data" / "structured_schemas.json"
EOS = structured.ENDOFTEXT  # <|endoftext|>: the end token of both plain JSON grammars
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
WORDS = (VOCAB_SIZE + 31) // 32
med = np.median


def ms_since(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


class Llg:
    name = "llguidance"

    def __init__(self) -> None:
        self.tokenizer = structured.ll_tokenizer()  # moerun's: every special token a real token
        self.bits = np.zeros(WORDS, dtype=np.int32)

    def compile(self, schema: dict) -> llg.LLMatcher:
        lark = "start: " + structured.json_rule({**schema, "x-guidance": COMPACT})
        grammar = llg.LLMatcher.grammar_from_lark(lark)
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=structured.LIMITS)
        if matcher.is_error():
            head = matcher.get_error().split("\n   1 |")[0].splitlines()  # not the grammar
            raise ValueError(" ".join(head[:1] + [x for x in head if x.startswith("error:")]))
        return matcher

    def mask(self, matcher: llg.LLMatcher) -> np.ndarray:
        matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        return self.bits

    def consume(self, matcher: llg.LLMatcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


@contextlib.contextmanager
def native_stderr(lines: list[str]) -> Iterator[None]:
    """Collects what native code writes to fd 2 (xgrammar's warnings) into `lines`."""
    with tempfile.TemporaryFile("w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line.split("Warning: ")[-1][:150] for line in sink.read().splitlines()]


class Xgr:
    def __init__(self, dynamic: bool) -> None:
        self.name = "xgrammar dynamic" if dynamic else "xgrammar"
        enc = load_tokenizer()
        vocab = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]  # specials: text
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE,
                                 stop_token_ids=[EOS])  # fmt: skip
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False,
                                            enable_dynamic_compilation=dynamic)  # fmt: skip
        self.bits = xgr.allocate_token_bitmask(1, VOCAB_SIZE)
        self.warnings: list[str] = []

    def compile(self, schema: dict) -> xgr.GrammarMatcher:
        self.warnings = []
        with native_stderr(self.warnings):
            grammar = self.compiler.compile_json_schema(
                schema, any_whitespace=False, separators=(",", ":"), strict_mode=False
            )
        return xgr.GrammarMatcher(grammar)

    def mask(self, matcher: xgr.GrammarMatcher) -> np.ndarray:
        matcher.fill_next_token_bitmask(self.bits)
        return self.bits[0].numpy()

    def consume(self, matcher: xgr.GrammarMatcher, token: int) -> None:
        assert matcher.accept_token(token)


def allowed(bits: np.ndarray) -> np.ndarray:
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:VOCAB_SIZE].view(bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=64, help="most tokens walked per schema")
    args = ap.parse_args()
    torch.set_num_threads(1)
    enc = load_tokenizer()
    cases = json.loads(SCHEMAS.read_text())
    libs: list[Llg | Xgr] = []
    setup: dict[str, float] = {}
    for make in (Llg, lambda: Xgr(False), lambda: Xgr(True)):
        t0 = time.perf_counter_ns()
        libs.append(make())
        setup[libs[-1].name] = ms_since(t0)
    for lib in libs:  # one-time initialisation outside the timings
        lib.mask(lib.compile({"type": "object"}))
    names = [lib.name for lib in libs]
    compile_ms: dict[str, list[float]] = {n: [] for n in names}
    first_us: dict[str, list[float]] = {n: [] for n in names}
    mask_us: dict[str, list[float]] = {n: [] for n in names}
    notes: dict[str, dict[str, str]] = {n: {} for n in names}  # refusals, xgrammar's warnings
    walk = {"whole example": 0, f"cut at {args.steps} tokens": 0}
    fell_back: dict[str, str] = {}
    for key, case in cases.items():
        matchers = {}
        for lib in libs:
            t0 = time.perf_counter_ns()
            try:
                matchers[lib.name] = lib.compile(case["schema"])
            except Exception as e:  # noqa: BLE001 - any refusal is a result
                notes[lib.name][key] = f"refused, {type(e).__name__}: {str(e)[:150]}"
                continue
            compile_ms[lib.name].append(ms_since(t0))
            if getattr(lib, "warnings", None):
                notes[lib.name][key] = "accepted, ignoring: " + "; ".join(sorted(set(lib.warnings)))
        if len(matchers) < len(libs):
            continue
        text = json.dumps(case["example"], separators=(",", ":"), ensure_ascii=False)
        tokens = enc.encode_ordinary(text) + [EOS]
        for step in range(args.steps):
            masks = {}
            for lib in libs:
                t0 = time.perf_counter_ns()
                bits = lib.mask(matchers[lib.name])
                (mask_us if step else first_us)[lib.name].append(ms_since(t0) * 1e3)
                masks[lib.name] = allowed(bits)
            both = np.logical_and.reduce(list(masks.values()))
            if step < len(tokens) and key not in fell_back and both[tokens[step]]:
                token = tokens[step]
            else:
                if key not in fell_back:
                    no = [
                        n for n, ok in masks.items() if step >= len(tokens) or not ok[tokens[step]]
                    ]
                    fell_back[key] = f"token {step} refused by {', '.join(no)}"
                if not both.any():
                    break
                token = int(np.argmax(both))  # the lowest id all allow
            for lib in libs:
                lib.consume(matchers[lib.name], token)
            if token == EOS:
                break
        if key not in fell_back:
            walk["whole example" if token == EOS else f"cut at {args.steps} tokens"] += 1
    moerun_ms, moerun_refused = [], 0
    structured.check_grammar("start: %json {}")  # warm up
    for case in cases.values():
        t0 = time.perf_counter_ns()
        try:
            structured.check_grammar(structured.turn_grammar(case["schema"]))
            moerun_ms.append(ms_since(t0))
        except ValueError:
            moerun_refused += 1

    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line]
    print(f"host: {cpu[0].split(':', 1)[1].strip()}, 1 thread; vocab {VOCAB_SIZE}")
    print(f"llguidance {version('llguidance')}, xgrammar {version('xgrammar')}")
    walked = ", ".join(f"{v} {k}" for k, v in walk.items())
    print(f"walks: {walked}, {len(fell_back)} left the example for lowest-id tokens")
    print(
        "\n| library | tokenizer setup ms | compiled | compile ms median | compile ms max "
        "| first mask us median | first mask us max | mask us median | mask us p99 | masks |"
    )
    print("|---" * 10 + "|")
    for n in names:
        c, f, m, p99 = compile_ms[n], first_us[n], mask_us[n], np.percentile(mask_us[n], 99)
        print(
            f"| {n} | {setup[n]:.0f} | {len(c)} / {len(cases)} | {med(c):.2f} | {max(c):.2f} "
            f"| {med(f):.0f} | {max(f):.0f} | {med(m):.1f} | {p99:.1f} | {len(m)} |"
        )
    print(
        f"\nmoerun turn grammar (check_grammar(turn_grammar(schema))): {len(moerun_ms)} / "
        f"{len(cases)} compile, median {med(moerun_ms):.2f} ms, "
        f"max {max(moerun_ms):.2f} ms; {moerun_refused} refused\n"
    )
    for n in names[:2]:  # xgrammar dynamic compiles the same schemas as xgrammar
        for key, note in notes[n].items():
            print(f"{n}: {key}: {note}")
    for key, why in fell_back.items():
        print(f"left the example: {key}: {why}")


if __name__ == "__main__":
    main()
