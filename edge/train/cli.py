"""`edge train <what>`: the training commands."""
from __future__ import annotations


def register(sub) -> None:
    from edge.train import detector, mesh

    p = sub.add_parser("train", help="train the detector (or its heads) on labelled images")
    what = p.add_subparsers(dest="what", required=True)
    detector.register(what)
    mesh.register(what)
