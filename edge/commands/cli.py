"""The `edge` command line. Bad input exits with code 2 and a one-line message, no traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from PIL import Image

from edge.api import Detector
from edge.atomic import Terminated, atomic_file, write_json
from edge.commands import bench, compress, evaluate, parity, sensitivity, soak, stream, train
from edge.commands.args import add_model_args, build_pipeline, input_size_arg, setup_process, unit_float
from edge.draw import draw_detections
from edge.errors import EdgeError, ImageError, ImageWarning, OutputError
from edge.image_io import load_image
from edge.outputs import IMAGE_SUFFIXES, check_output_file, check_output_folder, display, distinct_names
from edge.pipeline import PostConfig
from edge.weights.load import load_weights
from edge.weights.registry import REGISTRY


def draw_targets(draw: str | None, images: list[str]) -> list[Path] | None:
    """Where `--draw` puts each image's overlay, checked before any work: one image and a path that is not
    an existing folder -> that file (an image extension); otherwise a folder (existing or new) holding one
    file per image, named so that no two collide (`edge.outputs.distinct_names`). A target that is one of
    the input images is refused: an input is never overwritten."""
    if not draw:
        return None
    d = Path(draw)
    if len(images) == 1 and not d.is_dir():
        targets = [check_output_file(d, "--draw", IMAGE_SUFFIXES)]
    else:
        check_output_folder(d, "--draw")
        targets = [d / n for n in distinct_names(images, ".png")]
    inputs = {os.path.realpath(p) for p in images}
    for t in targets:
        if os.path.realpath(t) in inputs:
            raise OutputError(f"--draw would overwrite the input image {display(t)}; choose another folder or name")
    return targets


def _save_image(img, path: Path) -> None:
    fmt = Image.registered_extensions()[path.suffix.lower()]
    with atomic_file(path) as tmp:
        img.save(tmp, format=fmt)


def cmd_detect(args) -> int:
    draws = draw_targets(args.draw, args.images)  # every output checked before the model is even loaded
    if args.json:
        check_output_file(args.json, "--json")
    post = PostConfig(score_threshold=args.score, nms_threshold=args.nms)
    pipe, desc = build_pipeline(args, args.input_size, post)
    detector = Detector(pipe, desc)
    print(f"model: {desc}; input {'native (padded to 32)' if args.input_size is None else args.input_size}", file=sys.stderr)
    results, failures = [], []
    for i, image in enumerate(args.images):
        shown = display(image)
        try:  # one bad image is reported and the others go on
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ImageWarning)
                img = load_image(image)
            notes = [str(w.message) for w in caught if issubclass(w.category, ImageWarning)]
            for n in notes:
                print(f"warning: {n}", file=sys.stderr)
            det = detector.detections(img)
        except ImageError as e:
            failures.append(shown)
            results.append({"image": shown, "error": str(e)})
            print(f"error: {e}", file=sys.stderr)
            continue
        entry = {"image": shown, "model": desc, "faces": det.to_json()}
        if notes:
            entry["warnings"] = notes
        results.append(entry)
        print(f"{shown}: {len(det)} faces (score >= {args.score})")
        if draws:
            draws[i].parent.mkdir(exist_ok=True)
            _save_image(draw_detections(img, [(det, (0, 255, 0))]), draws[i])
            print(f"  drawn: {display(draws[i])}", file=sys.stderr)
    if args.json:
        write_json(args.json, results[0] if len(results) == 1 else results)
    if failures and len(args.images) > 1:
        print(f"error: {len(failures)} of {len(args.images)} images failed: {', '.join(failures)}"[:2000], file=sys.stderr)
    return 2 if failures else 0


def cmd_weights(args) -> int:
    if args.action == "list":
        for e in REGISTRY.values():
            modes = [f"{m}: " + " / ".join(f"{100 * e.accuracy[m][s]:.2f}" for s in ("easy", "medium", "hard"))
                     for m in ("640", "native") if m in e.accuracy]
            acc = "; ".join(modes) + f" (easy / medium / hard; {e.accuracy['protocol']})" if modes else "not measured"
            print(f"{e.name}: {e.arch.name}, {e.params:,} params, sha256 {e.sha256[:16]}..., {e.license}\n  source: {e.source}\n  WIDER val AP: {acc}")
        return 0
    model, info = load_weights(args.name)
    print(f"{info.describe()} -> {info.path}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge", description="RetinaFace-MobileNet-0.25 on edge devices, with parity proofs.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="detect faces in images")
    d.add_argument("images", nargs="+")
    add_model_args(d)
    d.add_argument("--input-size", type=input_size_arg, default=640, help="square letterbox side, or 'native' (default 640)")
    d.add_argument("--score", type=unit_float, default=0.5)
    d.add_argument("--nms", type=unit_float, default=0.4)
    d.add_argument("--json", default=None, help="write detections as JSON")
    d.add_argument("--draw", default=None, help="write the image with boxes and landmarks (PNG; a folder for several images)")
    d.set_defaults(func=cmd_detect)

    w = sub.add_parser("weights", help="list the weights registry, or fetch/convert one entry")
    w.add_argument("action", choices=["list", "fetch"])
    w.add_argument("name", nargs="?", default="default")
    w.set_defaults(func=cmd_weights)

    _add_later_commands(sub)
    return ap


def _add_later_commands(sub) -> None:
    """The sub-commands written in their own modules."""
    for command in (evaluate, parity, soak, bench, train, compress, sensitivity, stream):
        command.register(sub)


def run(argv, parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143


def main(argv=None) -> int:
    setup_process()
    return run(argv, make_parser())


if __name__ == "__main__":
    sys.exit(main())
