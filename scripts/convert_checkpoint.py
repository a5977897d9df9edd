"""Converts a GGUF file or HF folder into a meshserve (orbax) checkpoint directory.

python scripts/convert_checkpoint.py --output /tmp/smollm2            # the bundled SmolLM2-135M GGUF
python scripts/convert_checkpoint.py --source model.gguf --output ckpt --dtype bfloat16
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

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

_SOURCE = flags.DEFINE_string("source", None, "GGUF file or HF folder to convert (default: the bundled SmolLM2 GGUF).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the checkpoint into (must be absent or empty).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Dtype the parameters are stored in.")
flags.mark_flag_as_required("output")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        source = _SOURCE.value or bundled_gguf_path()
        convert(source, _OUTPUT.value, dtype=DTYPES[_DTYPE.value], progress=True)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {_DTYPE.value} checkpoint of {source} to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
