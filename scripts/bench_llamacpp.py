"""llama.cpp (llama-cpp-python) on the same GGUF, same prompt shape and threads as
Chartline's examples/bench_gguf.rs: prefill of a 512-token prompt (best of 3) and greedy
decode of 128 tokens; then this machine's memory bandwidth (numpy copy) and the decode
ceiling it implies. Run by scripts/bench-inference.sh; not part of CI."""
import os
import sys
import time

import numpy as np
from llama_cpp import Llama

model = sys.argv[1]
threads = int(os.environ.get("BENCH_THREADS", "2"))
llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
text = ("The patient is a 67-year-old man with a history of hypertension, type 2 diabetes mellitus "
        "and chronic kidney disease stage 3, admitted with chest pain radiating to the left arm. ") * 40
prompt = llm.tokenize(text.encode(), add_bos=True, special=True)[:512]

llm.reset()
llm.eval(prompt)  # warm-up
prefill = []
for _ in range(3):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill.append(512 / (time.perf_counter() - t))
# Greedy decode through llama.cpp's own sampler (top_k 1): the first token follows the
# prefill, so time the 128 after it. Best of three, as Chartline's side.
decode = []
for _ in range(3):
    gen = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
    next(gen)
    t = time.perf_counter()
    for _ in range(128):
        next(gen)
    decode.append(128 / (time.perf_counter() - t))
runs = "/".join(f"{p:.0f}" for p in prefill)
druns = "/".join(f"{d:.0f}" for d in decode)
print(f"llama.cpp: prefill {max(prefill):.1f} tok/s (512-token prompt, best of 3; runs {runs}), decode {max(decode):.1f} tok/s (128 tokens, best of 3; runs {druns}), threads {threads}")

# Memory bandwidth: copy a 1 GiB array (read 1 GiB + write 1 GiB), best of 5.
a = np.ones(256 * 1024 * 1024, dtype=np.float32)
b = np.empty_like(a)
np.copyto(b, a)
best = 0.0
for _ in range(5):
    t = time.perf_counter()
    np.copyto(b, a)
    best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
weights = os.path.getsize(model)
print(f"memory bandwidth (numpy copy, read+write): {best / 1e9:.1f} GB/s")
print(f"bytes read per decoded token ~ the weights, {weights / 1e6:.0f} MB (the 262k x 640 tied embedding is read whole for the logits)")
print(f"decode ceiling ~ {best / weights:.1f} tok/s")
