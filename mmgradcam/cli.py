"""The ``mmgradcam`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def _write_outputs(out: Path, summary: dict, arrays: dict, image=None) -> None:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    np.savez_compressed(out / "maps.npz", **arrays)
    if image is not None and not (out / "image.png").is_file():
        image.save(out / "image.png")


def _print_caption(result) -> None:
    print(f"caption: {result.caption}")
    print(f"log-prob of the caption: {result.caption_logprob:.3f}")
    for word, logprob in zip(result.words, result.word_logprobs):
        print(f"  {word:<12} {logprob:8.3f}")


def _explain_caption(image, args: argparse.Namespace, out: Path):
    from .report.figures import caption_figure
    from .tasks import captioning
    from .tasks.geometry import load_image

    pil = load_image(image, what="IMAGE")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    captioner = captioning.load(args.model)
    result = captioner.explain(pil, caption=args.caption, method=methods[0], layer=args.layer,
                               counterfactual=args.counterfactual, beam_size=args.beam)
    arrays = result.arrays()
    arrays[f"maps@{methods[0]}"] = arrays["maps"]
    for method in methods[1:]:  # the same caption, other methods (for the report's method switch)
        other = captioner.explain(pil, caption=result.caption, method=method, layer=args.layer,
                                  counterfactual=args.counterfactual)
        arrays[f"maps@{method}"] = other.maps.numpy()
    summary = {**result.summary(), "methods": methods}
    if args.panels:
        from .report.figures import word_panels

        guided = captioner.explain(pil, caption=result.caption, method="guided-gradcam", layer=args.layer)
        against = captioner.explain(pil, caption=result.caption, method=methods[0], layer=args.layer,
                                    counterfactual=not args.counterfactual)
        print(f"wrote {word_panels(pil, result.words, result.maps, guided.guided_maps, against.maps, out / 'panels.png', args.formats)}")
    _print_caption(result)
    _write_outputs(out, summary, arrays, pil)
    figure = caption_figure(pil, result, out / "caption.png", common_scale=args.common_scale,
                            formats=args.formats)
    print(f"wrote {figure}, {out / 'result.json'}, {out / 'maps.npz'}")
    if args.html:
        _write_html(out, args.common_scale)
    return result


def _write_html(out: Path, common_scale: bool = False) -> None:
    from .report.build import build_report

    print(f"wrote {build_report(out, common_scale=common_scale)}")


def _add_caption_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--model", default="default", help="'default', a model directory (or HF id)")
    parser.add_argument("--method", default="gradcam",
                        help="gradcam, gradcam++, hirescam, xgradcam, layercam or guided-gradcam; "
                             "several separated by commas (the report gets a method switch)")
    parser.add_argument("--layer", default=None, help="dotted layer name (default: the model's preset)")
    parser.add_argument("--counterfactual", action="store_true", help="maps of what speaks against each word")
    parser.add_argument("--beam", type=int, default=1, help="beam size when generating the caption")
    parser.add_argument("--common-scale", action="store_true", help="one color scale for all words")
    parser.add_argument("--html", action="store_true", help="also write the interactive report.html")
    parser.add_argument("--panels", action="store_true",
                        help="also write panels.png: Grad-CAM, Guided Grad-CAM and counterfactual per word")
    parser.add_argument("--format", dest="formats", action="append", choices=["png", "svg", "pdf"], default=[],
                        help="also save the figures as svg/pdf (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output directory")


def cmd_caption(args: argparse.Namespace) -> int:
    _explain_caption(args.image, args, args.out)
    return 0


def cmd_vqa(args: argparse.Namespace) -> int:
    from .report.figures import vqa_figure
    from .tasks import vqa
    from .tasks.geometry import load_image

    pil = load_image(args.image, what="IMAGE")
    model = vqa.load(args.model)
    result = model.explain(pil, args.question, answer=args.answer or None, top_k=args.top_k, method=args.method,
                           counterfactual=args.counterfactual, contrast=args.contrast, score=args.score,
                           layer=args.layer)
    print(f"Q: {args.question}")
    for answer, probability in result.top_answers[:max(args.top_k, 1)]:
        print(f"  {answer:<10} {probability:6.3f}")
    _write_outputs(args.out, result.summary(), result.arrays(), pil)
    figure = vqa_figure(pil, result, args.out / "vqa.png", common_scale=args.common_scale, formats=args.formats)
    print(f"explained: {', '.join(result.answers)}" + (f" (against {args.contrast})" if args.contrast else ""))
    print(f"wrote {figure}, {args.out / 'result.json'}, {args.out / 'maps.npz'}")
    if args.html:
        _write_html(args.out, args.common_scale)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    print(f"wrote {build_report(args.result_dir, common_scale=args.common_scale)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from .data.shapes import make_image

    pixels, objects, _ = make_image(args.seed, seed=20_251_121, size=args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    image_path = args.out / "image.png"
    Image.fromarray(pixels).save(image_path)
    print(f"shapes-world image {image_path}: " + ", ".join(f"{o.color} {o.shape}" for o in objects))
    args.caption = None
    result = _explain_caption(image_path, args, args.out)
    # a quick look at localization: does each shape word's map peak inside an object of that shape?
    for j, word in enumerate(result.words):
        matching = [o for o in objects if word in (o.shape, o.shape + "s")]
        if matching:
            y, x = result.summary()["words"][j]["peak_yx"]
            hit = any(o.mask[y, x] for o in matching)
            print(f"  map of {word!r} peaks at (y={y}, x={x}): {'inside' if hit else 'outside'} the {word}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.pipeline import EvalConfig, run_eval

    if args.captions is None and args.questions is None:
        raise ValueError("give --captions (caption words) and/or --questions with --answers (VQA)")
    config = EvalConfig(
        instances=str(args.instances), images=str(args.images), out=str(args.out),
        captions=str(args.captions) if args.captions else None,
        questions=str(args.questions) if args.questions else None,
        answers=str(args.answers) if args.answers else None, model=args.model, vqa_model=args.vqa_model,
        method=args.method, layer=args.layer, limit=args.limit, batch_size=args.batch_size,
        references=args.references, synonyms=str(args.synonyms) if args.synonyms else None,
        sanity_images=args.sanity_images, faithfulness_images=args.faithfulness_images, seed=args.seed,
        skip_captions=args.captions is None,
    )
    summary = run_eval(config, progress=not args.quiet)
    if summary is not None:
        print((Path(args.out) / "summary.md").read_text())
        if args.html:
            _write_html(Path(args.out))
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import write_split

    bias = dict(item.split("=", 1) for item in args.bias.split(",")) if args.bias else None
    for split in args.split:
        paths = write_split(args.out, split, args.num_images, seed=args.seed, size=args.size, bias=bias,
                            image_format=args.format, progress=True)
        print(f"{split}: {args.num_images} images in {paths['images']}; " +
              ", ".join(str(paths[k].name) for k in ("instances", "captions", "questions", "answers")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgradcam",
        description="Grad-CAM explanations for image-captioning and visual-question-answering models.",
    )
    parser.add_argument("--version", action="version", version=f"mmgradcam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    caption = commands.add_parser("caption", help="explain every word of an image's caption")
    caption.add_argument("image", help="image file")
    caption.add_argument("--caption", default=None, help="caption to explain (default: generate one)")
    _add_caption_options(caption, "out/caption")
    caption.set_defaults(func=cmd_caption)

    ask = commands.add_parser("vqa", help="answer a question about an image and explain the answers")
    ask.add_argument("image", help="image file")
    ask.add_argument("question")
    ask.add_argument("--answer", action="append", default=[], help="answer to explain (repeatable; "
                     "default: the top answers)")
    ask.add_argument("--top-k", type=int, default=3, help="how many top answers to print and explain")
    ask.add_argument("--contrast", default=None, help="also map the first answer against this one")
    ask.add_argument("--score", choices=["logit", "logprob"], default="logit")
    ask.add_argument("--model", default="default", help="'default' or a model directory (or HF id)")
    ask.add_argument("--method", default="gradcam")
    ask.add_argument("--layer", default=None)
    ask.add_argument("--counterfactual", action="store_true", help="why not: negated gradients")
    ask.add_argument("--common-scale", action="store_true")
    ask.add_argument("--html", action="store_true", help="also write the interactive report.html")
    ask.add_argument("--format", dest="formats", action="append", choices=["png", "svg", "pdf"], default=[])
    ask.add_argument("--out", type=Path, default=Path("out/vqa"))
    ask.set_defaults(func=cmd_vqa)

    demo = commands.add_parser("demo", help="render a shapes-world image and explain its caption")
    demo.add_argument("--seed", type=int, default=7, help="which image to render")
    demo.add_argument("--size", type=int, default=128)
    _add_caption_options(demo, "out/demo")
    demo.set_defaults(func=cmd_demo)

    evaluate = commands.add_parser("eval", help="score word (and answer) maps against COCO segmentations")
    evaluate.add_argument("--instances", type=Path, required=True, help="COCO instances json (masks)")
    evaluate.add_argument("--images", type=Path, required=True, help="directory of the images")
    evaluate.add_argument("--captions", type=Path, default=None, help="COCO captions json (for --references)")
    evaluate.add_argument("--questions", type=Path, default=None, help="VQA v2 questions json")
    evaluate.add_argument("--answers", type=Path, default=None, help="VQA v2 annotations json with object_ids")
    evaluate.add_argument("--model", default="default", help="captioner: 'default', a directory or HF id")
    evaluate.add_argument("--vqa-model", default="default", help="VQA model: 'default', a directory or HF id")
    evaluate.add_argument("--method", default="gradcam")
    evaluate.add_argument("--layer", default=None)
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N images (by id)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--references", action="store_true", help="also explain each image's first reference caption")
    evaluate.add_argument("--synonyms", type=Path, default=None, help="extra word<TAB>category table")
    evaluate.add_argument("--sanity-images", type=int, default=0, help="model-randomization check on N images")
    evaluate.add_argument("--faithfulness-images", type=int, default=0, help="deletion/insertion AUCs on N images")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument("--html", action="store_true", help="also write report.html and the figures")
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.set_defaults(func=cmd_eval)

    report = commands.add_parser("report", help="write report.html for a caption, vqa or eval result directory")
    report.add_argument("result_dir", type=Path)
    report.add_argument("--common-scale", action="store_true")
    report.set_defaults(func=cmd_report)

    shapes = commands.add_parser("make-shapes", help="write a shapes-world data set (COCO format)")
    shapes.add_argument("--out", type=Path, required=True)
    shapes.add_argument("--num-images", type=int, default=1000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--split", nargs="+", default=["train", "val", "test"])
    shapes.add_argument("--size", type=int, default=128)
    shapes.add_argument("--format", choices=["png", "jpg"], default="png")
    shapes.add_argument("--bias", default=None, help='confound an attribute, e.g. "circle=red"')
    shapes.set_defaults(func=cmd_make_shapes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError, KeyError) as error:
        print(f"mmgradcam {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
