"""The command lines of the distillation tools: ``convert`` (published sets into a validated
distilled.npz), ``compare`` (finished distillations side by side) and ``quality`` (does a set's
quality decide DP's?). Each returns its exit status; a user error is one line, status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from dp_jax.cli.common import USER_ERRORS, OneLineParser, check_output
from dp_jax.distill import importers as convert
from dp_jax.reports import distill_baselines, distill_compare, distill_quality
from dp_jax.tasks import settings as settings_lib

FORMATS, SPACES = convert.FORMATS, convert.SPACES


def convert_args(argv) -> argparse.Namespace:
    """Flags (``argv`` without the program name); see the module docstring."""
    p = OneLineParser(prog="python -m dp_jax.distill.convert", description=convert.__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, help="|".join(FORMATS))
    p.add_argument("--out", required=True, help="distilled.npz to write")
    p.add_argument("--images", help="mtt: images_*.pt (N, C, H, W)")
    p.add_argument("--labels", help="mtt: labels_*.pt (N,) integer")
    p.add_argument("--data", help="idc: data.pt, a saved [data (N, C, H, W), target (N,)]")
    p.add_argument("--factor", type=int, help="idc: multi-formation factor (1 = none)")
    p.add_argument("--npz", help="npz: file with images, labels and optional lr")
    p.add_argument("--layout", default="auto", help="npz images: auto|nhwc|nchw")
    p.add_argument("--lr", type=float, help="step size, when the source has none")
    p.add_argument("--lr_file", help="mtt: a torch-saved scalar step size (synthetic_lr)")
    p.add_argument("--space", help="|".join(SPACES) + " (default: pixels for idc, else model)")
    p.add_argument("--source_mean", help="space=standardised: per-channel mean, comma-separated")
    p.add_argument("--source_std", help="space=standardised: per-channel std, comma-separated")
    p.add_argument("--config", help="experiment config path[:variant] giving the data settings")
    p.add_argument("--dataset", help="fashion_mnist | tfds:<name> | npz:<path>")
    p.add_argument("--preprocess", help="standard|zca|none, as data.preprocess")
    p.add_argument("--zca_eps", type=float, help="as data.zca_eps (0.1)")
    p.add_argument("--train_size", type=int, help="as data.train_size (0 = all)")
    p.add_argument("--data_dir", help="as data.data_dir")
    p.add_argument("--image_size", type=int, help="as data.image_size (tfds)")
    p.add_argument("--seed", type=int, help="as config seed (picks the train_size subset)")
    return p.parse_args(argv)


def convert_main(argv=None) -> int:
    """Command-line entry; ``argv`` excludes the program name. Returns the exit status."""
    args = convert_args(sys.argv[1:] if argv is None else argv)

    def go():
        check_output("out", args.out, file=True)  # before the (possibly slow) conversion
        return convert.convert(args)
    dset = _user_errors(go)
    if dset is None:
        return 2
    print(f"wrote {args.out}: {len(dset)} images ({dset.stored_images.shape[0]} stored, factor "
          f"{dset.factor}) of {dset.dataset}, lr {dset.lr:.4g}, preprocessing "
          f"{dset.preprocessing['kind']}")
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``python -m dp_jax.distill.compare WORKDIR ... --out=DIR [--baselines=...]``."""
    ap = OneLineParser(prog="python -m dp_jax.distill.compare",
                       description=distill_compare.__doc__.split("\n")[0])
    ap.add_argument("workdirs", nargs="+", help="finished distillation workdirs")
    ap.add_argument("--out", required=True, help="directory for compare.md and the plot")
    ap.add_argument("--baselines", default=",".join(distill_baselines.DEFAULT_BASELINES),
                    help="real subsets of each set's size, evaluated like the set: none, or "
                         "comma-separated names of " + ", ".join(distill_baselines.BASELINES))
    args = ap.parse_args(argv)

    def go():
        baselines = distill_baselines.parse_baselines(args.baselines)  # before any work
        check_output("out", args.out)
        return distill_compare.write(
            args.workdirs, args.out, baselines=baselines,
            settings_of=lambda workdir: settings_lib.from_workdir(workdir)[0])
    text = _user_errors(go)
    if text is None:
        return 2
    print(text)
    return 0


def quality_main(argv: Sequence[str] | None = None) -> int:
    """``python -m dp_jax.distill.quality NAME=SET,PRUNING ... --out=DIR``."""
    ap = OneLineParser(prog="python -m dp_jax.distill.quality",
                       description=distill_quality.__doc__.split("\n")[0])
    ap.add_argument("pairs", nargs="+", help="NAME=SET_WORKDIR[#random],PRUNE_WORKDIR[:LABEL]")
    ap.add_argument("--sparsities", default="0.893,0.956")
    ap.add_argument("--seeds", default="", help="only these seeds, e.g. 0,1 (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def go():
        sparsities = _numbers("sparsities", args.sparsities, float)
        seeds = _numbers("seeds", args.seeds, int) or None
        check_output("out", args.out)
        return distill_quality.write(args.pairs, sparsities, seeds, args.out)
    text = _user_errors(go)
    if text is None:
        return 2
    print(text)
    return 0


def _numbers(flag: str, text: str, kind: type) -> list:
    """``--flag``'s comma-separated numbers; a ValueError names the flag."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag}={text} is invalid; allowed: comma-separated "
                         f"{'integers' if kind is int else 'numbers'}") from None


def _user_errors(fn: Callable):
    """``fn()``, or None after printing a user error as one line (the caller returns 2)."""
    try:
        return fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return None
