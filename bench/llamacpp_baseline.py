"""The llama.cpp baseline: W1 and W2 on GGUF files of the same weights meshserve serves, in the same run.

The file has two halves that never run in the same process:

- In meshserve's venv (needs the `gguf` package): `comparison_gguf` writes F32, F16 or Q8_0 GGUFs of a source GGUF's
  weights into the cache (`$MESHSERVE_CACHE/llamacpp`), dequantized with `gguf.quants.dequantize` exactly as
  checkpoints/gguf.py does for meshserve, so the F32 file holds the very float32 values meshserve's float32 engine
  computes with. Every metadata key (tokenizer, chat template, rope, norms) is copied unchanged but
  `general.file_type`; tensors keep llama.cpp's layout (its q/k row permutation included), so llama.cpp reads the
  file as it reads the original. `run` starts the second half as a subprocess under the llama.cpp venv
  (scripts/install_llamacpp.sh) and returns its JSON: meshserve's process never imports llama_cpp.
- In the llama.cpp venv (`python bench/llamacpp_baseline.py SPEC.json OUT.json`, standard library, numpy and
  llama_cpp only): `run_spec` drives llama-cpp-python's low-level C API (`llama_decode` on `llama_batch`es, greedy
  argmax on the host over the logits llama.cpp returns), so no Python sampler chain or detokenizer is timed.

What is compared, and how (shared/PERFORMANCE.md, "a fair side-by-side"):
- The same prompt token ids (meshserve's tokenizer and chat template; token ids are passed, never text), greedy,
  exactly `max_tokens` new tokens (EOS never checked), warm-up excluded, medians of `repeats`, the same threads as
  meshserve uses (all the cores this process may run on).
- W1: TTFT is the prompt's `llama_decode` plus the argmax of its last row (the KV cache cleared first, as meshserve
  empties its prefix cache). Decode tokens/s is the `max_tokens - 1` one-token steps after the prompt, each a
  `llama_decode` and an argmax, as meshserve's decode pass times its generate dispatches after the prefill.
- W2: all prompts in one job, as `llama-batched` does it: one sequence per prompt (`n_seq_max` = prompts, a KV
  stream per sequence, `kv_unified` off, since the prompts share only the chat template's opening), the prompts read
  in packed batches of `n_batch` tokens, then one batch of one token per sequence per step. llama-cpp-python 0.3.x
  has no batched high-level API, and its `Llama` class runs one sequence; this is the batched C API it wraps.
  Unlike meshserve, every prompt token is computed (no prefix cache across sequences): `prefill_s` is reported apart
  so decode can be compared alone.
- MBU as meshserve's runner counts it: per step, the weight bytes one token reads (every tensor of the file once; a
  tied embedding is the output head, so it is read whole) plus the KV positions attended times the KV cache's bytes
  per position, over the step time, over the bandwidth meshserve measured in the same run.
- llama.cpp keeps its own defaults where meshserve has no counterpart: flash attention "auto", and an F16 KV cache
  unless `kv_type` says f32 (meshserve's float32 engine keeps f32 K/V; at W1's ~170 positions the cache is <1% of the
  bytes a step reads). The build leaves out ggml's AMX path (it crashes on the Q4_1 file; scripts/install_llamacpp.sh
  says why), which F32 / F16 weights never take.
- llama.cpp collapses on a busy machine (its threads spin at barriers: 1-5 tok/s instead of ~45-65 at a load average
  of 3-5 on 2 cores) far more than meshserve does, so each row records the load average around it: compare only rows
  taken on a quiet machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

VARIANTS = ("f32", "f16", "q8_0", "shipped")
"""GGUFs llama.cpp can be run on: the source's weights dequantized to F32, as F16, requantized to Q8_0 (llama.cpp's
8-bit, the closest to meshserve's int8 weights), or the source file as shipped."""

KV_TYPES = {"f32": 0, "f16": 1}
"""llama.cpp KV cache types (ggml_type ids)."""
_KV_BYTES = {"f32": 4, "f16": 2}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
"""llama.cpp's flash attention switch (enum llama_flash_attn_type)."""

INSTALL_SCRIPT = "scripts/install_llamacpp.sh"


# ----- meshserve's side: GGUF files and the subprocess ------------------------------------------------------------


def default_venv() -> str:
    """The llama.cpp venv scripts/install_llamacpp.sh makes: $LLAMACPP_VENV, else .venv-llamacpp in the repository."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("LLAMACPP_VENV") or os.path.join(repo, ".venv-llamacpp")


def venv_python(venv: str) -> str:
    """The venv's interpreter; FileNotFoundError naming the install script when the venv is missing."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        raise FileNotFoundError(
            f"llama.cpp venv {venv} is missing; run `bash {INSTALL_SCRIPT}` (or set --llamacpp_venv)"
        )
    return python


def write_gguf(source: str, dest: str, variant: str) -> None:
    """Writes `source`'s weights and metadata to `dest` as `variant` ("f32", "f16" or "q8_0"): every tensor
    dequantized to float32 as checkpoints/gguf.py does; f16 / q8_0 then convert matrices only (1-D tensors, the
    norms, stay F32, as llama.cpp's converter leaves them)."""
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    if variant not in file_types:
        raise ValueError(f"cannot write a {variant!r} GGUF; choose one of {', '.join(file_types)}")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        # GGUF.* are the reader's header counts; the writer sets the architecture, the alignment and the file type.
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY and len(field.types) != 2:
            raise ValueError(f"{source}: {key} is a nested array, which this copy does not handle")
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    if "general.alignment" in reader.fields:
        writer.add_custom_alignment(int(reader.fields["general.alignment"].contents()))
    writer.add_file_type(int(file_types[variant]))
    for tensor in reader.tensors:
        # ggml lists the fastest-varying axis first; numpy wants it last (the writer turns it back).
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape))).astype(np.float32, copy=False)
        if variant == "f32" or values.ndim == 1:
            writer.add_tensor(tensor.name, values)
        elif variant == "f16":
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor.name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def comparison_gguf(source: str, variant: str, cache: str | None = None) -> str:
    """The GGUF llama.cpp runs for `variant`: `source` itself for "shipped", else a file written once into
    `cache` (default `$MESHSERVE_CACHE/llamacpp`), named after the source's name, size and mtime so an edited source
    gets a fresh one, and renamed into place only when complete."""
    import hashlib

    if variant not in VARIANTS:
        raise ValueError(f"unknown llama.cpp variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant == "shipped":
        return source
    if cache is None:
        from engine.paths import cache_root

        cache = os.path.join(cache_root(), "llamacpp")
    stat = os.stat(source)
    name = os.path.basename(source)
    digest = hashlib.sha256(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    dest = os.path.join(cache, f"{stem}-{digest}.{variant.upper()}.gguf")
    if os.path.isfile(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dest) + ".partial-", dir=cache)
    os.close(fd)
    try:
        write_gguf(source, tmp, variant)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache's other files are readable
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def gguf_facts(path: str) -> dict[str, Any]:
    """What MBU needs from a GGUF: the bytes of weights one decode token reads, the tensor types, and the shape of a
    cached position (layers x kv heads x head dim, per K and per V)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(f"{arch}.{key}")
        return default if field is None else field.contents()

    weight_bytes = sum(int(t.n_bytes) for t in tensors.values())
    embed = tensors.get("token_embd.weight")
    if embed is not None and "output.weight" in tensors:
        # an untied head is its own tensor: the embedding table is read one row per token
        rows = int(embed.shape[1])
        weight_bytes -= int(embed.n_bytes) - int(embed.n_bytes) // rows
    heads = int(meta("attention.head_count"))
    kv_heads = meta("attention.head_count_kv", heads)
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else int(kv_heads)
    head_dim = int(meta("attention.key_length", int(meta("embedding_length")) // heads))
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "file": path,
        "file_bytes": os.path.getsize(path),
        "weight_bytes_per_token": weight_bytes,
        "tensor_types": types,
        "kv_elements_per_token": 2 * int(meta("block_count")) * kv_heads * head_dim,
    }


def source_gguf(checkpoint: str | None) -> str:
    """The GGUF a meshserve checkpoint spec names ("bundled"/None or a .gguf path): the file both systems read.
    ValueError for anything else (an orbax dir or an HF folder has no GGUF to hand llama.cpp)."""
    if checkpoint in (None, "", "bundled"):
        from checkpoints.bundled import bundled_gguf_path

        return bundled_gguf_path()
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if not (os.path.isfile(path) and path.lower().endswith(".gguf")):
        raise ValueError(
            f"the llama.cpp baseline needs a GGUF checkpoint ('bundled' or a .gguf file), not {checkpoint}"
        )
    return path


def make_spec(
    source: str,
    variant: str,
    workload: str,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    repeats: int,
    threads: int,
    kv_type: str = "f16",
    flash_attn: str = "auto",
    bandwidth: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec, facts): what the llama.cpp process runs (`run_spec`, `serve_w1`) for `variant`'s GGUF of `source`
    (written if missing; W1 takes the first prompt only), and that file's `gguf_facts`."""
    path = comparison_gguf(source, variant)
    facts = gguf_facts(path)
    spec = {
        "model": path,
        "workload": workload,
        "prompts": [list(map(int, p)) for p in (prompts[:1] if workload == "w1" else prompts)],
        "max_tokens": max_tokens,
        "repeats": repeats,
        "threads": threads,
        "kv_type": kv_type,
        "flash_attn": flash_attn,
        "weight_bytes_per_token": facts["weight_bytes_per_token"],
        "kv_elements_per_token": facts["kv_elements_per_token"],
        "bandwidth": bandwidth,
    }
    return spec, facts


def compare(
    python: str,
    source: str,
    variants: Sequence[str],
    workload: str,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    repeats: int,
    threads: int,
    kv_type: str = "f16",
    flash_attn: str = "auto",
    bandwidth: float | None = None,
) -> dict[str, Any]:
    """llama.cpp's figures for `workload` ("w1": the first prompt, "w2": all of them in one job) on each variant's
    GGUF of `source`, one subprocess per variant, one after another. W2 rows keep the first prompt's tokens only."""
    rows = []
    for variant in variants:
        spec, facts = make_spec(
            source, variant, workload, prompts, max_tokens, repeats, threads, kv_type, flash_attn, bandwidth
        )
        # llama.cpp's threads spin at barriers, so a busy machine slows it many times over (seen here: 50x under
        # a load average of 5 on 2 cores); the load around each row tells a quiet run from a spoiled one
        load_before = os.getloadavg()[0]
        result = run(python, spec)
        if workload == "w2":
            result["tokens"] = result["tokens"][:1]
        rows.append({"variant": variant, **facts, **result, "load_average_1m": [load_before, os.getloadavg()[0]]})
    return {
        "source": source,
        "threads": threads,
        "kv_type": kv_type,
        "flash_attn": flash_attn,
        "bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
        "rows": rows,
    }


def run(python: str, spec: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Runs `spec` (see `run_spec`) in a subprocess of `python` (the llama.cpp venv's) and returns its result.
    RuntimeError with the tail of llama.cpp's log when it fails."""
    with tempfile.TemporaryDirectory(prefix="llamacpp-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        proc = subprocess.run(
            [python, os.path.abspath(__file__), spec_path, out_path],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0 or not os.path.isfile(out_path):
            tail = (proc.stderr or proc.stdout)[-3000:]
            raise RuntimeError(f"llama.cpp baseline failed (exit {proc.returncode}) on {spec.get('model')}:\n{tail}")
        with open(out_path, encoding="utf-8") as f:
            return json.load(f)


class W1Session:
    """One llama.cpp process holding one GGUF (`serve_w1`), timing one W1 pass per `run()`: passes of meshserve and
    llama.cpp can then alternate, so both see the same machine. A VM's memory bandwidth drifts by a third within
    minutes (seen on the Zen 5 VM: 72 -> 96 tok/s and back within one minute, in both programs), which decides a
    comparison of runs taken one after the other; rounds that alternate do not depend on it."""

    def __init__(self, python: str, spec: dict[str, Any]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="llamacpp-")
        spec_path = os.path.join(self._dir.name, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        self._log = open(os.path.join(self._dir.name, "log.txt"), "w+", encoding="utf-8")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--serve", spec_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.model = spec["model"]
        if self._read_line() != "ready":
            raise self._failed("did not start")

    def _read_line(self) -> str:
        return self._proc.stdout.readline().strip()

    def _failed(self, what: str) -> RuntimeError:
        self._proc.kill()
        self._proc.wait()
        self._log.seek(0)
        return RuntimeError(
            f"llama.cpp baseline {what} (exit {self._proc.returncode}) on {self.model}:\n{self._log.read()[-3000:]}"
        )

    def run(self) -> dict[str, Any]:
        """One W1 pass: ttft_s, decode_s, decode_tokens_per_s, tokens."""
        try:
            self._proc.stdin.write("pass\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._failed("stopped") from None
        line = self._read_line()
        if not line:
            raise self._failed("stopped")
        return json.loads(line)

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> W1Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----- the llama.cpp venv's side ----------------------------------------------------------------------------------


def _median_run(runs: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median (the middle one of an odd count, the lower middle of an even one)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def decode_mbu(
    weight_bytes: float,
    kv_bytes_per_position: float,
    positions_read: float,
    steps: int,
    seconds: float,
    bandwidth: float | None,
) -> float | None:
    """Bytes the decode steps read (the weights once per step, plus every KV position attended) per second, over the
    measured bandwidth; None without a bandwidth."""
    if not bandwidth or seconds <= 0:
        return None
    return (steps * weight_bytes + positions_read * kv_bytes_per_position) / seconds / bandwidth


class _Model:
    """A llama.cpp model and one context, driven through the C API with host-side greedy argmax."""

    def __init__(self, spec: dict[str, Any], n_seq: int, n_ctx_seq: int) -> None:
        import llama_cpp as ll

        self.ll = ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = ll.llama_model_load_from_file(spec["model"].encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['model']}")
        self.vocab_size = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        cparams = ll.llama_context_default_params()
        # a KV stream per sequence: n_ctx is split over n_seq_max when kv_unified is off
        block = 256
        cparams.n_ctx = n_seq * -(-n_ctx_seq // block) * block
        cparams.n_batch = int(spec.get("n_batch", 2048))
        cparams.n_seq_max = n_seq
        cparams.kv_unified = bool(spec.get("kv_unified", False))
        cparams.n_threads = cparams.n_threads_batch = int(spec["threads"])
        cparams.type_k = cparams.type_v = KV_TYPES[spec.get("kv_type", "f16")]
        cparams.flash_attn_type = FLASH_ATTN[spec.get("flash_attn", "auto")]
        cparams.no_perf = True
        self.n_batch = cparams.n_batch
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.context = {
            "n_ctx": ll.llama_n_ctx(self.ctx),
            "n_batch": cparams.n_batch,
            "n_ubatch": cparams.n_ubatch,
            "n_seq_max": n_seq,
            "kv_unified": bool(cparams.kv_unified),
            "flash_attn_type": int(cparams.flash_attn_type),
            "kv_type": spec.get("kv_type", "f16"),
            "threads": int(spec["threads"]),
            "model_size_bytes": int(ll.llama_model_size(self.model)),
        }
        self.batch = ll.llama_batch_init(max(self.n_batch, n_seq), 0, 1)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """One `llama_decode` of (token, position, sequence, wants logits) entries; the argmax of each row asked for,
        in the entries' order."""
        b = self.batch
        for i, (token, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(entries)} tokens")
        outputs = sum(1 for e in entries if e[3])
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(outputs, self.vocab_size))
        return logits.argmax(axis=1)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
        """Reads every prompt (sequence i = prompt i), packed into batches of at most `n_batch` tokens. Returns each
        prompt's first new token and the seconds from the call until it was known."""
        start = time.perf_counter()
        first, ready = [0] * len(prompts), [0.0] * len(prompts)
        entries: list[tuple[int, int, int, bool]] = []

        def flush() -> None:
            owners = [seq for _, _, seq, out in entries if out]
            tokens = self.decode(entries)
            now = time.perf_counter() - start
            for seq, token in zip(owners, tokens, strict=True):
                first[seq], ready[seq] = int(token), now
            entries.clear()

        for seq, ids in enumerate(prompts):
            for pos, token in enumerate(ids):
                entries.append((int(token), pos, seq, pos == len(ids) - 1))
                if len(entries) == self.n_batch:
                    flush()
        if entries:
            flush()
        return first, ready


def _w1_pass(m: _Model, ids: Sequence[int], n_new: int) -> tuple[list[int], float, float]:
    """(tokens, TTFT seconds, decode seconds) of one W1 generation from an empty cache."""
    m.clear()
    start = time.perf_counter()
    (token,), _ = m.prefill([ids])
    ttft = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for k in range(n_new - 1):
        (token,) = m.decode([(tokens[-1], len(ids) + k, 0, True)])
        tokens.append(int(token))
    return tokens, ttft, time.perf_counter() - start


def _w1(m: _Model, spec: dict[str, Any]) -> dict[str, Any]:
    (ids,) = spec["prompts"]
    n_new, repeats = int(spec["max_tokens"]), int(spec["repeats"])

    def generate() -> tuple[list[int], float, float]:
        return _w1_pass(m, ids, n_new)

    generate()  # warm-up, excluded
    runs = []
    for _ in range(repeats):
        tokens, ttft, seconds = generate()
        runs.append({"ttft_s": ttft, "decode_s": seconds, "tokens": tokens})
    steps = n_new - 1
    # step k attends the prompt and every token before it: len(ids) + k + 1 positions
    positions = sum(len(ids) + k + 1 for k in range(steps))
    mid = _median_run(runs, "decode_s")
    kv_per_position = spec["kv_elements_per_token"] * _KV_BYTES[spec.get("kv_type", "f16")]
    return {
        "prompt_tokens": len(ids),
        "output_tokens": n_new,
        "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1e3,
        "runs_ttft_ms": [r["ttft_s"] * 1e3 for r in runs],
        "decode_tokens_per_s": steps / mid["decode_s"] if steps else None,
        "step_ms": mid["decode_s"] / steps * 1e3 if steps else None,
        "runs_tokens_per_s": [steps / r["decode_s"] for r in runs] if steps else [],
        "mbu": decode_mbu(
            spec["weight_bytes_per_token"], kv_per_position, positions, steps, mid["decode_s"], spec.get("bandwidth")
        )
        if steps
        else None,
        "tokens": mid["tokens"],
    }


def _w2(m: _Model, spec: dict[str, Any]) -> dict[str, Any]:
    prompts = spec["prompts"]
    n_new, repeats = int(spec["max_tokens"]), int(spec["repeats"])

    def job(new_tokens: int) -> dict[str, Any]:
        m.clear()
        start = time.perf_counter()
        first, ready = m.prefill(prompts)
        prefill_s = time.perf_counter() - start
        outputs = [[t] for t in first]
        positions = 0
        for k in range(new_tokens - 1):
            # sequence s decodes its last token at position len(prompt s) + k, attending every position up to it
            entries = [
                (out[-1], len(ids) + k, s, True) for s, (ids, out) in enumerate(zip(prompts, outputs, strict=True))
            ]
            positions += sum(len(ids) + k + 1 for ids in prompts)
            for out, token in zip(outputs, m.decode(entries), strict=True):
                out.append(int(token))
        wall = time.perf_counter() - start
        return {"wall_s": wall, "prefill_s": prefill_s, "ttft_s": ready, "tokens": outputs, "positions": positions}

    job(min(n_new, 16))  # warm-up, excluded: every batch shape of the job, a shorter decode
    runs = [job(n_new) for _ in range(repeats)]
    mid = _median_run(runs, "wall_s")
    total = len(prompts) * n_new
    steps = n_new - 1
    decode_s = mid["wall_s"] - mid["prefill_s"]
    kv_per_position = spec["kv_elements_per_token"] * _KV_BYTES[spec.get("kv_type", "f16")]
    ttft_ms = sorted(t * 1e3 for t in mid["ttft_s"])
    return {
        "prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": total,
        "wall_s": mid["wall_s"],
        "output_tokens_per_s": total / mid["wall_s"],
        "runs_wall_s": [r["wall_s"] for r in runs],
        "prefill_s": mid["prefill_s"],
        "decode_tokens_per_s": len(prompts) * steps / decode_s if steps else None,
        "step_ms": decode_s / steps * 1e3 if steps else None,
        "ttft_ms": {"p50": float(np.percentile(ttft_ms, 50)), "p99": float(np.percentile(ttft_ms, 99))},
        "mbu": decode_mbu(
            spec["weight_bytes_per_token"], kv_per_position, mid["positions"], steps, decode_s, spec.get("bandwidth")
        )
        if steps
        else None,
        "tokens": mid["tokens"],
    }


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one workload in this (llama.cpp) process. `spec`: model (GGUF path), workload ("w1": one prompt, or "w2":
    all prompts in one job), prompts (token id lists), max_tokens, repeats, threads, kv_type ("f16" / "f32"),
    weight_bytes_per_token and kv_elements_per_token (`gguf_facts`), bandwidth (bytes/s, for MBU; may be None),
    n_batch (prefill batch, default 2048)."""
    import llama_cpp

    if spec["workload"] not in ("w1", "w2"):
        raise ValueError(f"unknown workload {spec['workload']!r}: the llama.cpp baseline runs w1 and w2")
    prompts = spec["prompts"]
    if spec["workload"] == "w1" and len(prompts) != 1:
        raise ValueError("w1 takes exactly one prompt")
    n_ctx_seq = max(len(p) for p in prompts) + int(spec["max_tokens"])
    m = _Model(spec, len(prompts), n_ctx_seq)
    try:
        figures = _w1(m, spec) if spec["workload"] == "w1" else _w2(m, spec)
        context = m.context
    finally:
        m.close()
    return {
        "workload": spec["workload"].upper(),
        "model": spec["model"],
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "context": context,
        **figures,
    }


def serve_w1(spec: dict[str, Any]) -> None:
    """`W1Session`'s other end: loads the model once, runs one untimed pass, says "ready", then answers each line of
    stdin with one W1 pass as a JSON line (ttft_s, decode_s, decode_tokens_per_s, tokens) until stdin closes."""
    (ids,) = spec["prompts"]
    n_new = int(spec["max_tokens"])
    m = _Model(spec, 1, len(ids) + n_new)
    try:
        _w1_pass(m, ids, n_new)
        print("ready", flush=True)
        for _ in sys.stdin:
            tokens, ttft, seconds = _w1_pass(m, ids, n_new)
            steps = n_new - 1
            line = {"ttft_s": ttft, "decode_s": seconds, "decode_tokens_per_s": steps / seconds, "tokens": tokens}
            print(json.dumps(line), flush=True)
    finally:
        m.close()


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[1] == "--serve":
        with open(argv[2], encoding="utf-8") as f:
            serve_w1(json.load(f))
        return 0
    if len(argv) != 3:
        print("usage: llamacpp_baseline.py SPEC.json OUT.json (run by bench.llamacpp_baseline.run)", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    result = run_spec(spec)
    with open(argv[2], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
