"""Save the DUFM reference solutions as networks for `nearest-etf bounds`.

Writes OUT/dnc/network.pt (the optimally scaled DNC point, `dufm.reference.dnc_point`: an
orthogonal frame of rank K in every layer) and OUT/srg/network.pt (the SRG construction after
local optimisation, `srg_point` + `optimise_locally`: rank r = 5 in H_1..H_{L-1} for K = 10),
both at the given width, as `LayerStack`s with X = H_1^T (`dufm.run.layer_stack_of_dufm`). This
gives a DNC solution at the same width as the low-rank solutions gradient descent finds at
width 30, which `nearest-etf dufm run` never reaches there.

    .venv/bin/python benchmarks/dufm_reference_networks.py --out runs/bounds/dufm-reference
    nearest-etf bounds --run runs/bounds/dufm-reference --rank-rtol 0.01
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nearest_etf.experiments.dufm.model import DUFMProblem
from nearest_etf.experiments.dufm.reference import dnc_point, optimise_locally, srg_point
from nearest_etf.experiments.dufm.run import layer_stack_of_dufm
from nearest_etf.experiments.layer_stack import save_layer_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=30)
    parser.add_argument("--wd", type=float, default=0.004, help="every lambda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    problem = DUFMProblem(
        layers=args.layers,
        classes=args.classes,
        width=args.width,
        per_class=1,
        lambda_h=args.wd,
        lambda_w=args.wd,
    )
    dnc = dnc_point(problem)
    dnc_loss = problem.loss_parts(dnc).total
    points = {"dnc": dnc, "srg": optimise_locally(problem, srg_point(problem))}
    for name, params in points.items():
        loss = problem.loss_parts(params).total
        meta = {"source": f"dufm reference {name}", "found_dnc": name == "dnc"}
        config = {**vars(args), "out": str(args.out)}
        meta |= {"loss": loss, "loss_over_dnc": loss / dnc_loss, "config": config}
        path = save_layer_stack(
            layer_stack_of_dufm(problem, params, meta), args.out / name / "network.pt"
        )
        print(f"{name}: loss {loss:.5f} (loss / L_DNC {loss / dnc_loss:.4f}) -> {path}")


if __name__ == "__main__":
    main()
