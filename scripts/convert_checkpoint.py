"""Converts a GGUF file or HF folder into a meshserve (orbax) checkpoint directory.

python scripts/convert_checkpoint.py --output /tmp/smollm2            # the bundled SmolLM2-135M GGUF
python scripts/convert_checkpoint.py --source model.gguf --output ckpt --dtype bfloat16
python scripts/convert_checkpoint.py --output /tmp/smollm2-int8 --quantize=int8   # int8 weights + float32 scales
"""

from __future__ import annotations

import os
import sys

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes
import numpy as np
from absl import app, flags

from checkpoints.bundled import bundled_gguf_path, convert
from checkpoints.errors import CheckpointError
from engine.quant import QUANTIZATIONS

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

_SOURCE = flags.DEFINE_string("source", None, "GGUF file or HF folder to convert (default: the bundled SmolLM2 GGUF).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the checkpoint into (must be absent or empty).")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", list(DTYPES), "Dtype the parameters are stored in (with --quantize=int8: the norms and biases)."
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    "none",
    list(QUANTIZATIONS),
    "int8: store the linear weights and embeddings as int8 + a float32 scale per output channel (a GGUF's blocks "
    "converted without a float32 copy of the model); engines restore them as int8.",
)
flags.mark_flag_as_required("output")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        source = _SOURCE.value or bundled_gguf_path()
        convert(source, _OUTPUT.value, dtype=DTYPES[_DTYPE.value], progress=True, quantize=_QUANTIZE.value)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    kind = _DTYPE.value if _QUANTIZE.value == "none" else f"{_QUANTIZE.value} ({_DTYPE.value} norms)"
    print(f"wrote {kind} checkpoint of {source} to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
