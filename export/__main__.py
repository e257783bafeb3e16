"""python -m export --checkpoint CKPT --out ENGINE [--dtype fp32,int8,bf16] [--force] [...]

Exports a GMR checkpoint (a local HuggingFace Qwen2-VL / Qwen2.5-VL directory, released layout
or ours) to an engine directory and validates every variant against the fp32 reference before
it is put in place. A reduced precision (int8, bf16) that fails validation while other variants
pass is left out of the engine, with the reason in its manifest (``validation.refused``) and in
the printed summary; fp32, or a variant requested alone, failing is an error. Exit code 0 on
success, 2 for a bad checkpoint or arguments, 3 when validation refuses the engine or the file
system fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="local GMR / Qwen2(.5)-VL checkpoint directory")
    parser.add_argument("--out", required=True, help="engine directory to create")
    parser.add_argument("--dtype", default="fp32,int8,bf16",
                        help="comma-separated variants to build and validate: fp32, int8 (onnxruntime int8 "
                             "operators), bf16 (the torch backend, over the fp32 weights: no extra disk; "
                             "without fp32 over bf16 weight files, half fp32's size); "
                             "default fp32,int8,bf16")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--reference", default="auto", choices=["auto", "hf", "streamed"],
                        help="fp32 reference: the HF model, or (for models whose fp32 weights do not fit in memory) "
                             "HF's vision tower and positions with the decoder streamed layer by layer; auto picks")
    parser.add_argument("--reference-cache", metavar="DIR",
                        help="where the fp32 reference's scores are kept per checkpoint and pair, so that another "
                             "export of the same checkpoint only computes pairs it has not seen (default "
                             "$GMR_FAST_CACHE_DIR/reference, else ~/.cache/gmr_fast/reference)")
    parser.add_argument("--no-reference-cache", action="store_true",
                        help="compute the whole reference afresh and keep none of it")
    parser.add_argument("--validation-queries", type=int, default=4, help="queries of the validation set")
    parser.add_argument("--validation-documents", type=int, default=20, help="documents per validation query")
    parser.add_argument("--validation-long-documents", type=int, default=12,
                        help="documents of the long validation group (a ~900-token image query, long documents, "
                             "judged apart); 0 leaves the group out")
    parser.add_argument("--int8-keep", help="comma-separated glob patterns of weights kept out of int8 in the int8 "
                                            "variant, as --int8-kept says (default: none, escalating only if ranking "
                                            "agreement needs it)")
    parser.add_argument("--int8-kept", default="fp32", choices=["fp32", "int8-weights"],
                        help="what the kept weights become: fp32, or 8-bit weights with fp32 activations and "
                             "arithmetic (MatMulNBits: a quarter of fp32's bytes, slower on few rows; it may rank "
                             "below the bar where fp32 passes, as at GMR-7B's full depth)")
    parser.add_argument("--int8-activations", choices=["tensor", "row"],
                        help="int8 activation scales: one per tensor (DynamicQuantizeMatMul, fastest on AMX) or one "
                             "per token (MatMulInteger U8S8: a pair's score does not depend on what shares its "
                             "batch); default: per tensor, with one per-token attempt when per tensor fails with the "
                             "first layer and the merger kept (export.engine_export.int8_attempts)")
    parser.add_argument("--int8-smooth", type=float, metavar="ALPHA",
                        help="SmoothQuant scale migration for the int8 MatMuls with this alpha (default 0.5 with "
                             "per-tensor activations, 0.8 with per-token ones): input ranges are calibrated on pairs "
                             "apart from the validation set and activation outlier channels move into the weights "
                             "(export/calibrate.py); 0 turns it off")
    parser.add_argument("--accept-fp32-rel-error", type=float, help="override the fp32 bar (max error / score spread)")
    parser.add_argument("--accept-min-tau", type=float, help="override the reduced-precision per-query Kendall tau bar")
    parser.add_argument("--accept-long-tau", type=float, help="override the long group's Kendall tau bar")
    parser.add_argument("--accept-min-top10", type=float, help="override the reduced-precision mean top-10 overlap bar")
    parser.add_argument("--threads", type=int, help="threads for validation")
    parser.add_argument("--fp32-over-bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="from a checkpoint stored in bf16: the fp32 variant runs on the torch backend over "
                             "bf16 weight files (exact: bf16 holds every weight), validated as fp32; half fp32's "
                             "weight memory and disk. With --dtype bf16 it is added beside bf16 over the same "
                             "files; with --dtype fp32 alone, no bf16 variant is built or validated. Default: "
                             "only where fp32's weights would not fit in memory (GMR-7B on a 24 GB machine)")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (not available yet)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gmr_fast").setLevel(logging.INFO)
    if args.tensorrt:
        print("error: --tensorrt is not implemented yet: TensorRT plan building is still open work "
              "(issue 3); export without it and run the ONNX engine", file=sys.stderr)
        return 2
    from gmr_fast.errors import CheckpointError, ConfigError, ExportError, GmrError

    from .engine_export import ExportOptions, export_engine
    from .validate import Criterion

    criterion = Criterion()
    if args.accept_fp32_rel_error is not None:
        criterion.fp32_max_rel_error = args.accept_fp32_rel_error
    if args.accept_min_tau is not None:
        criterion.min_query_tau = args.accept_min_tau
    if args.accept_long_tau is not None:
        criterion.min_long_tau = args.accept_long_tau
    if args.accept_min_top10 is not None:
        criterion.min_mean_top10 = criterion.min_top10 = args.accept_min_top10
    options = ExportOptions(dtypes=tuple(d.strip() for d in args.dtype.split(",") if d.strip()), force=args.force,
                            validation_queries=args.validation_queries, validation_documents=args.validation_documents,
                            validation_long_documents=args.validation_long_documents,
                            reference=args.reference, criterion=criterion, num_threads=args.threads,
                            int8_keep=tuple(p.strip() for p in args.int8_keep.split(",")) if args.int8_keep else None,
                            int8_activations=args.int8_activations, int8_kept=args.int8_kept,
                            int8_smooth=args.int8_smooth, fp32_over_bf16=args.fp32_over_bf16,
                            reference_cache=False if args.no_reference_cache else args.reference_cache)
    try:
        manifest = export_engine(args.checkpoint, args.out, options)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except GmrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: I/O error ({e.filename or ''}): {e.strerror or e}", file=sys.stderr)
        return 3
    summary = {"engine": args.out, "variants": {p: {k: v.validation.get(k) for k in
                                                    ("max_abs_diff", "max_rel_error", "kendall_tau", "top10_overlap_mean")}
                                                for p, v in manifest.variants.items()},
               **({"refused": manifest.validation["refused"]} if manifest.validation.get("refused") else {})}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
