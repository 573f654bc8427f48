"""Write a small random FLUX pipeline (diffusers layout) fully offline.

    python script/make_tiny_flux.py --output_dir tiny-flux [--size tiny|small] [--seed 0]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import ArgumentParser, nonnegative_int, run  # noqa: E402
from model.tiny_flux import SIZES, build_tiny_flux, count_parameters  # noqa: E402


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_flux(args.output_dir, size=args.size, seed=args.seed)

    from diffusers import FluxTransformer2DModel

    n = count_parameters(FluxTransformer2DModel.from_pretrained(path, subfolder="transformer"))
    print(f"wrote a {args.size} FLUX pipeline to {path} (transformer: {n / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    run(main)
