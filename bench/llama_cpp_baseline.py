"""llama.cpp's greedy tokens/s on a GGUF file, for `bench/single_job.py` (benchmark (g)).

Runs under any Python that has `llama-cpp-python` (it is never a dependency of gemma-jobs):

    python bench/llama_cpp_baseline.py MODEL.gguf --prompt "..." --new-tokens 32 --sequences 1 --runs 5

Decodes `--sequences` copies of the prompt together (one llama.cpp batch per step, one
sequence id each), greedy, and prints one JSON line: generated tokens per second, the prompt's
evaluation included in the time, as the handbook's reference numbers are.
"""

from __future__ import annotations

import argparse
import json
import time

import llama_cpp
import numpy as np


def decode_together(llm: llama_cpp.Llama, ctx, prompt: list[int], sequences: int, new_tokens: int) -> int:
    """Generate greedily for `sequences` copies of the prompt; return the tokens generated."""
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(max(len(prompt), 1) * sequences, 0, sequences)
    try:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        rows = [(seq, position, token, position == len(prompt) - 1)
                for seq in range(sequences) for position, token in enumerate(prompt)]
        live, generated, last = set(range(sequences)), 0, {}
        for step in range(new_tokens):
            batch.n_tokens = len(rows)
            for i, (seq, position, token, wants_logits) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0], batch.logits[i] = seq, wants_logits
                if wants_logits:
                    last[seq] = i
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = []
            for seq in sorted(live):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, last[seq]), shape=(n_vocab,))
                token = int(logits.argmax())
                generated += 1
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    live.discard(seq)
                else:
                    rows.append((seq, len(prompt) + step, token, True))
            if not rows:
                break
        return generated
    finally:
        llama_cpp.llama_batch_free(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the GGUF file")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    llm = llama_cpp.Llama(args.gguf, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 512 * args.sequences
    params.n_batch = params.n_ubatch = 512 * args.sequences
    params.n_seq_max = args.sequences
    params.kv_unified = True  # one buffer: llama.cpp splits n_ctx per sequence otherwise
    params.n_threads = params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    prompt = llm.tokenize(args.prompt.encode(), add_bos=True)
    decode_together(llm, ctx, prompt, args.sequences, 4)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(args.runs):
        started = time.perf_counter()
        tokens += decode_together(llm, ctx, prompt, args.sequences, args.new_tokens)
        seconds += time.perf_counter() - started
    llama_cpp.llama_free(ctx)
    print(json.dumps({"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
                      "llama_cpp": llama_cpp.__version__, "sequences": args.sequences, "threads": args.threads}))


if __name__ == "__main__":
    main()
