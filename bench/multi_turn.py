"""The follow-up-turn race (issue 13): moerun's prefix cache against llama.cpp's KV cache on the
same conversation, same token ids, each engine in its own process.

    python bench/compare_cpu.py --model /tmp/full20b --multi-turn 1500 [--new-tokens 60]

Turn 1 is a HISTORY-token prompt (one token generated), turn 2 resends those tokens plus
NEW_TOKENS more, and "alone" is a fresh prompt of NEW_TOKENS tokens: TTFT of each, every
repetition. moerun resumes turn 2 from its cache (moerun.bench.multi_turn); llama.cpp keeps its
KV cache after turn 1 and evaluates only the appended tokens (the best case for it: no
re-rendered assistant turn to rewind over).
"""

import statistics
import time


def worker_moerun(model: str, history: int, new: int) -> dict:
    from moerun.bench import multi_turn

    report = multi_turn(model, history, new, "bfloat16")
    return {"engine": "moerun bfloat16", "reps": report["reps"]}


def worker_llama(gguf_path: str, model: str, history: int, new: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np
    from compare_cpu import _prompt  # moerun.bench's random prompts, without loading weights
    from llama_cpp import Llama

    llm = Llama(gguf_path, n_ctx=history + new + 16, n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, flash_attn=True,
                verbose=False)  # fmt: skip
    n_vocab = llm.n_vocab()

    def ttft(tokens: list[int]) -> float:
        start = time.perf_counter()
        llm.eval(tokens)
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax()
        return time.perf_counter() - start

    llm.eval(_prompt(model, 8, 2))  # warm up
    reps = []
    for rep in range(2):  # the prompts moerun.bench.multi_turn uses, rep by rep
        llm.reset()
        t1 = ttft(_prompt(model, history, 10 + rep))
        t2 = ttft(_prompt(model, new, 100 + rep))  # appended to turn 1's cache
        llm.reset()
        alone = ttft(_prompt(model, new, 200 + rep))
        reps.append({"turn1_ttft_s": t1, "turn2_ttft_s": t2, "alone_ttft_s": alone,
                     "turn2_over_alone": t2 / alone})  # fmt: skip
    return {"engine": "llama.cpp", "reps": reps, "llama_cpp_python": llama_cpp.__version__}


KEYS = ("turn1_ttft_s", "turn2_ttft_s", "alone_ttft_s")


def table(res: dict, history: int, new: int) -> str:
    lines = [
        f"multi-turn: turn 1 = {history} tokens, turn 2 = those + {new}; TTFT s, each rep",
        f"{'engine':18}{'turn 1':>18}{'turn 2':>18}{'alone':>18}{'turn 2/alone':>14}",
    ]
    turn2 = {}
    for name, r in res.items():
        cols = [", ".join(f"{x[k]:.2f}" for x in r["reps"]) for k in KEYS]
        ratio = statistics.median(x["turn2_over_alone"] for x in r["reps"])
        turn2[name] = statistics.median(x["turn2_ttft_s"] for x in r["reps"])
        lines.append(f"{name:18}" + "".join(f"{c:>18}" for c in cols) + f"{ratio:>14.2f}")
    if len(turn2) == 2:
        mo, ll = turn2.values()
        lines.append(f"median turn-2 TTFT, moerun / llama.cpp: {mo / ll:.2f}")
    return "\n".join(lines)
