"""``python -m jaxwint2.quantize SRC DST``: the quantizer's command line (arguments only).

Parses arguments and calls :func:`converters.quantize_checkpoint`, which turns a bf16 ERNIE-4.5
MoE checkpoint (Paddle or HF layout) into a FastDeploy w4w2 Paddle checkpoint: WINT8 attention,
dense MLP and shared experts, WINT4 experts up to ``--w4-end-layer``, WINT2 (CCQ) experts after.
Bad input exits with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jaxwint2.quantize",
        description="Quantize a bf16 ERNIE-4.5 MoE checkpoint (Paddle or HF layout) into a "
                    "FastDeploy-compatible w4w2 (WINT8 dense / WINT4 + WINT2 experts) Paddle "
                    "checkpoint.")
    p.add_argument("src", help="bf16 source checkpoint directory")
    p.add_argument("dst", help="output directory (must not exist unless --force)")
    p.add_argument("--w4-end-layer", type=int, default=None,
                   help="MoE layers with index <= this get WINT4 experts, later ones WINT2 "
                        "(default: the first four MoE layers, as in the 300B release; -1: all "
                        "WINT2)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help=".safetensors/.npz of input Hessians X^T X/n per WINT2 linear, keyed "
                        "like layers.7.mlp.experts.up_gate, [K, K] or [E, K, K]: enables "
                        "GPTQ-style error feedback")
    p.add_argument("--calibration-text", metavar="FILE", default=None,
                   help="calibrate from text instead: a .txt (paragraphs) or .jsonl ({\"text\": "
                        "...} per line) file; the bf16 source model runs on it layer by layer "
                        "and each WINT2 expert's input Hessian (its routed tokens) enables "
                        "GPTQ-style error feedback")
    p.add_argument("--calibration-tokens", type=int, metavar="N", default=None,
                   help="tokens of --calibration-text to use (default 16384)")
    p.add_argument("--k-order", choices=("natural", "shuffled"), default="natural",
                   help="WINT2 in-group K order to write (wint2-format.md §3.2)")
    p.add_argument("--effort", choices=("fast", "default", "best"), default="default",
                   help="WINT2 search effort (fast: CPU previews; default: GPU)")
    p.add_argument("--num-shards", type=int, default=2, help="safetensors files to write")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.calibration and args.calibration_text:
        p.error("--calibration and --calibration-text are mutually exclusive")
    if args.calibration_tokens is not None and not args.calibration_text:
        p.error("--calibration-tokens needs --calibration-text")

    from converters import CheckpointError, quantize_checkpoint  # lazy: keeps --help fast

    try:
        summary = quantize_checkpoint(args.src, args.dst, w4_end_layer=args.w4_end_layer,
                                      calibration=args.calibration,
                                      calibration_text=args.calibration_text,
                                      calibration_tokens=args.calibration_tokens,
                                      k_order=args.k_order,
                                      effort=args.effort,
                                      num_shards=args.num_shards, force=args.force,
                                      progress=not args.no_progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
