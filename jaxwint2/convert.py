"""``python -m jaxwint2.convert SRC DST``: the converter's command line (arguments only).

Parses arguments and calls :func:`converters.convert_checkpoint`; bad input exits with status 2
and a one-line reason naming the file and tensor.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jaxwint2.convert",
        description="Convert a FastDeploy/Paddle (WINT2/WINT4/WINT8 or bf16), HF -PT or rank*/ "
                    "ERNIE-4.5 MoE checkpoint to jaxwint2's runtime layout (Orbax).")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="output directory (must not exist unless --force)")
    p.add_argument("--k-order", choices=("natural", "shuffled"), default="natural",
                   help="WINT2 in-group K order of the source (wint2-format.md §3.2)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="check that the model splits over N devices before converting; the "
                        "output is one TP-agnostic checkpoint for every N (pre-sharded rank*/ "
                        "sources are merged), sharded at load: jaxwint2.load(DST, "
                        "tensor_parallel_size=N) or python -m jaxwint2.serve "
                        "--tensor-parallel-size N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from converters import CheckpointError, convert_checkpoint  # lazy: keeps --help fast

    # SIGTERM unwinds like Ctrl-C, so the converter removes its temporary directory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.tensor_parallel_size != 1:  # fail before converting anything
            _check_tensor_parallel(args.src, args.tensor_parallel_size)
        summary = convert_checkpoint(args.src, args.dst, k_order=args.k_order, force=args.force,
                                     progress=not args.no_progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def _check_tensor_parallel(src: str, tp: int) -> None:
    from converters import CheckpointError, open_checkpoint
    from jaxwint2.parallel import check_tensor_parallel

    try:
        check_tensor_parallel(open_checkpoint(src).config, tp)
    except ValueError as e:
        raise CheckpointError(f"{src}: --tensor-parallel-size {tp}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
