"""python -m export --checkpoint CKPT --out ENGINE [--dtype fp32|fp16] [--force]

Exports a GMR checkpoint to an engine directory (manifest.json, tokenizer.json, vision.onnx,
decoder.onnx) and validates it against the torch reference before it is put in place.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="local GMR / Qwen2(.5)-VL checkpoint directory")
    parser.add_argument("--out", required=True, help="engine directory to create")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (not available yet)")
    parser.add_argument("--validation-pairs", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gmr_fast").setLevel(logging.INFO)
    if args.tensorrt:
        print("error: --tensorrt is not implemented yet: TensorRT plan building is still open work "
              "(issue 3); export without it and run the ONNX engine", file=sys.stderr)
        return 2
    from .engine_export import ExportError, ExportOptions, export_engine
    from .reference import CheckpointError
    from gmr_fast.errors import GmrError

    try:
        manifest = export_engine(args.checkpoint, args.out, ExportOptions(dtype=args.dtype, force=args.force,
                                                                          validation_pairs=args.validation_pairs))
    except (ExportError, CheckpointError, GmrError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"engine": args.out, "precision": manifest["precision"], **manifest["parity"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
