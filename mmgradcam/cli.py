"""The ``mmgradcam`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, available_methods


def _method_help(several: str = "") -> str:
    """--method's help: the registered methods (not a hard-coded list), "all", the default."""
    names = ", ".join(available_methods(pixel=True))
    return (f"{names}; several separated by commas, or 'all' (every method that applies to the model: the CAM "
            f"methods from the same forward and backward pass{several}, plus attention-gradcam and relevance "
            "for models that read the image through attention); default: the model's own default method")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_max_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-targets-per-backward", type=_positive_int, default=None, metavar="N",
                        help="at most N targets (words, answers) per batched backward: bounds memory, same maps "
                             "(default: auto, 64 on CPU, sized from free memory on CUDA)")


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


def _print_notice(result) -> None:
    """A default model's note that the image is not one it knows, once, on stderr (stdout keeps
    the results, so scripts reading it see no change)."""
    if getattr(result, "notice", None):
        print(f"note: {result.notice}", file=sys.stderr)


def _compare_method(captioner, requested: str | None, method: str) -> str | None:
    """The method the caption figure draws in a second row beside ``method``'s: --compare-method,
    else the model config's "compare_method"; None for "none", for none given, or when it is
    ``method``'s first method already."""
    from .engine.registry import is_pixel_method, method_names

    explicit = requested is not None
    if not explicit:
        config = getattr(captioner, "config", None)  # default-family models keep their config.json
        requested = config.get("compare_method") if isinstance(config, dict) else None
    if requested is None or requested.strip().lower() == "none":
        return None
    names = method_names(requested, known=available_methods())
    if len(names) != 1:
        raise ValueError(f"--compare-method takes one method, got {requested!r}")
    first = method_names(method)[0]
    if is_pixel_method(first):  # Guided Grad-CAM's figure has no CAM row to set beside another
        if explicit:
            raise ValueError(f"--compare-method needs a CAM --method, not {first!r}")
        return None
    return None if names[0] == first else names[0]


def _explain_caption(image, args: argparse.Namespace, out: Path):
    from .report.figures import caption_figure
    from .tasks import captioning
    from .tasks.geometry import load_image

    pil = load_image(image, what="IMAGE")
    captioner = captioning.load(args.model, **_placement(args), prompt=args.prompt)
    method = args.method or captioner.default_method
    compare = _compare_method(captioner, args.compare_method, method)
    # every method, the compared one included, from one forward and backward pass (the report gets
    # a method switch)
    if compare is not None:  # a list, so that "all" (every method that applies to the model) works too
        method = list(dict.fromkeys([*captioner.method_choice(method), compare]))
    chunk = args.max_targets_per_backward
    result = captioner.explain(pil, caption=args.caption, method=method, layer=args.layer,
                               counterfactual=args.counterfactual, beam_size=args.beam,
                               max_targets_per_backward=chunk)
    _print_notice(result)
    methods = result.methods
    arrays = result.arrays()
    summary = {**result.summary(), "methods": methods}
    if getattr(captioner, "prompt", None) is not None:  # a chat VLM: the user turn the caption answers
        summary["prompt"] = captioner.prompt
    if args.explain_text:
        from .eval.dissect import explain_text

        texts = explain_text(captioner, result.words, result.alphas, args.layer)
        summary["textual_explanations"] = texts
        for text in texts:
            print(text["sentence"])
    if args.panels:
        from .report.figures import word_panels

        guided = captioner.explain(pil, caption=result.caption, method="guided-gradcam", layer=args.layer,
                                   max_targets_per_backward=chunk)
        against = captioner.explain(pil, caption=result.caption, method=methods[0], layer=args.layer,
                                    counterfactual=not args.counterfactual, max_targets_per_backward=chunk)
        print(f"wrote {word_panels(pil, result.words, result.maps, guided.guided_maps, against.maps, out / 'panels.png', args.formats)}")
    _print_caption(result)
    _write_outputs(out, summary, arrays, pil)
    figure = caption_figure(pil, result, out / "caption.png", common_scale=args.common_scale,
                            formats=args.formats, compare=compare)
    print(f"wrote {figure}, {out / 'result.json'}, {out / 'maps.npz'}")
    if args.html:
        _write_html(out, args.common_scale)
    return result


def _write_html(out: Path, common_scale: bool = False) -> None:
    from .report.build import build_report

    print(f"wrote {build_report(out, common_scale=common_scale)}")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (CUDA, else Apple MPS, else the CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the forward's precision (autocast; maps are computed in float32)")


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (a clear message otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _placement(args: argparse.Namespace) -> dict:
    """load()'s device and dtype from the command line."""
    return {"device": args.device, "dtype": args.dtype}


def _add_caption_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    _add_device_options(parser)
    parser.add_argument("--model", default="default", help="'default', a model directory (or HF id)")
    parser.add_argument("--prompt", default=None,
                        help="chat VLMs (LLaVA): the user turn's text the caption answers (default: the family's, "
                             "'Describe the image.')")
    parser.add_argument("--method", default=None,
                        help=_method_help("; maps@METHOD in maps.npz, a method switch in the report"))
    parser.add_argument("--compare-method", default=None,
                        help="also draw this method's maps in a second row of caption.png (same pass); default: "
                             "the model config's compare_method, if any; 'none' for one row")
    parser.add_argument("--layer", default=None, help="dotted layer name (default: the model's preset)")
    parser.add_argument("--counterfactual", action="store_true", help="maps of what speaks against each word")
    parser.add_argument("--beam", type=int, default=1, help="beam size when generating the caption")
    parser.add_argument("--common-scale", action="store_true", help="one color scale for all words")
    parser.add_argument("--html", action="store_true", help="also write the interactive report.html")
    parser.add_argument("--explain-text", action="store_true",
                        help="name the channels each word rests on (Network Dissection on the shapes world)")
    parser.add_argument("--panels", action="store_true",
                        help="also write panels.png: Grad-CAM, Guided Grad-CAM and counterfactual per word")
    parser.add_argument("--format", dest="formats", action="append", choices=["png", "svg", "pdf"], default=[],
                        help="also save the figures as svg/pdf (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output directory")
    _add_max_targets(parser)


def cmd_caption(args: argparse.Namespace) -> int:
    _explain_caption(args.image, args, args.out)
    return 0


def cmd_vqa(args: argparse.Namespace) -> int:
    from .report.figures import vqa_figure
    from .tasks import vqa
    from .tasks.geometry import load_image

    pil = load_image(args.image, what="IMAGE")
    model = vqa.load(args.model, **_placement(args))
    result = model.explain(pil, args.question, answer=args.answer or None, top_k=args.top_k, method=args.method,
                           counterfactual=args.counterfactual, contrast=args.contrast, score=args.score,
                           layer=args.layer, max_targets_per_backward=args.max_targets_per_backward)
    _print_notice(result)
    print(f"Q: {args.question}")
    for answer, probability in result.top_answers[:max(args.top_k, 1)]:
        print(f"  {answer:<10} {probability:6.3f}")
    summary = {**result.summary(), "methods": result.methods}
    arrays = result.arrays()
    for name, (_, _, contrast_map) in result.method_maps.items():
        if contrast_map is not None:
            arrays[f"contrast_map@{name}"] = contrast_map.numpy()
    if args.explain_text:
        from .eval.dissect import explain_text

        summary["textual_explanations"] = explain_text(model, result.answers, result.alphas, args.layer)
        for text in summary["textual_explanations"]:
            print(text["sentence"])
    _write_outputs(args.out, summary, arrays, pil)
    figure = vqa_figure(pil, result, args.out / "vqa.png", common_scale=args.common_scale, formats=args.formats)
    print(f"explained: {', '.join(result.answers)}" + (f" (against {args.contrast})" if args.contrast else ""))
    print(f"wrote {figure}, {args.out / 'result.json'}, {args.out / 'maps.npz'}")
    if args.html:
        _write_html(args.out, args.common_scale)
    return 0


def _mask_for(args: argparse.Namespace, image_path: Path, words: list[str]):
    """The union mask of what ``words`` name in IMAGE, when --instances describes that image."""
    if not args.instances:
        return None
    import numpy as np

    from .eval.coco import CocoData
    from .eval.words import WordMapper

    data = CocoData.load(args.instances, Path(args.images) if args.images else image_path.parent)
    matches = [i for i, info in data.images.items() if Path(info["file_name"]).name == image_path.name]
    if not matches:
        raise ValueError(f"--instances has no image named {image_path.name!r}")
    from .tasks.geometry import load_image

    pil = load_image(image_path)
    by_category, by_color, _ = data.target_masks(matches[0], pil.height, pil.width)
    mapper = WordMapper(data.categories.values(), data.colors)
    masks = [(by_category if m.word_class == "noun" else by_color).get(m.target) for m in mapper.map(words)]
    masks = [m for m in masks if m is not None]
    return np.any(masks, axis=0) if masks else None


def cmd_adversarial(args: argparse.Namespace) -> int:
    import numpy as np

    from .eval.adversarial import attack_caption_word, attack_vqa_answer
    from .report.figures import adversarial_figure
    from .tasks.geometry import load_image

    pil = load_image(args.image, what="IMAGE")
    eps = args.eps / 255
    if args.question:
        from .tasks import vqa

        model = vqa.load(args.model, **_placement(args))
        answer = args.answer or model.answer(pil, args.question, top_k=1)[0][0]
        mask = _mask_for(args, Path(args.image), args.question.split())
        result = attack_vqa_answer(model, pil, args.question, answer, args.to, eps=eps, steps=args.steps, mask=mask,
                                   method=args.method)
        subject = f"answer {answer!r} -> {args.to!r}"
    else:
        from .tasks import captioning

        captioner = captioning.load(args.model, **_placement(args))
        caption = args.caption or captioner.generate(pil)
        if not args.word:
            raise ValueError("name the caption word to change with --word (or a --question for VQA)")
        mask = _mask_for(args, Path(args.image), [args.word])
        result = attack_caption_word(captioner, pil, caption, args.word, args.to, eps=eps, steps=args.steps, mask=mask,
                                     method=args.method)
        result["caption"] = caption
        subject = f"word {args.word!r} -> {args.to!r} in {caption!r}"
    arrays = result.pop("_arrays")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    np.savez_compressed(args.out / "maps.npz", **arrays)
    figure = adversarial_figure(arrays, result, args.out / "adversarial.png")
    print(f"attack on {subject}: {'flipped' if result['flipped'] else 'not flipped'} after {result['steps']} steps, "
          f"L-inf {result['linf_pixels'] * 255:.1f}/255")
    maps = result["maps"]
    if "original" in maps:
        print(f"map of the original {'answer' if args.question else 'word'} vs the object's mask: energy "
              f"{maps['original']['energy']:.2f} -> {maps['adversarial']['energy']:.2f}, pointing "
              f"{maps['original']['pointing_15px']:.0f} -> {maps['adversarial']['pointing_15px']:.0f}")
    print(f"rank correlation of the two maps ({result['method']}): {maps['spearman']}")
    for name, other in result["methods"].items():
        if name != result["method"]:
            print(f"  {name}: {other['spearman']}")
    print(f"wrote {figure}, {args.out / 'result.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from .report.figures import map_grid
    from .tasks import captioning
    from .tasks.geometry import load_image

    pil = load_image(args.image, what="IMAGE")
    first, second = captioning.load(args.model_a, **_placement(args)), captioning.load(args.model_b, **_placement(args))
    caption = args.caption or first.generate(pil)
    print(f"{args.model_a}: {first.generate(pil)}\n{args.model_b}: {second.generate(pil)}\nexplaining: {caption}")
    # every method of a model from one pass; one row of the grid per model and method
    results = [m.explain(pil, caption, method=args.method) for m in (first, second)]
    words = results[0].words
    chosen = [j for j, w in enumerate(words) if not args.word or w in args.word]
    if not chosen:
        raise ValueError(f"--word {args.word} not in the caption {caption!r}")
    rows = [(name, r.for_method(method)) for name, r in zip(("A", "B"), results) for method in r.methods]
    several = any(len(r.methods) > 1 for r in results)
    maps = torch.cat([torch.stack([r.maps[j] for j in chosen]) for _, r in rows])
    titles = [f"{name}{' ' + r.method if several else ''}: {words[j]}" for name, r in rows for j in chosen]
    path = map_grid(pil, maps, titles, args.out / "compare.png", suptitle=f"A = {args.model_a}, B = {args.model_b}",
                    columns=len(chosen) + 1)
    first_words, second_words = (r.summary()["words"] for r in results)
    summary = {"caption": caption, "models": [args.model_a, args.model_b],
               "methods": {"A": results[0].methods, "B": results[1].methods},
               "words": [{"word": words[j], "A": first_words[j], "B": second_words[j]} for j in chosen]}
    if several:
        for entry, j in zip(summary["words"], chosen):
            for name, r in rows:
                entry.setdefault(f"{name} by method", {})[r.method] = r.summary()["words"][j]
    (args.out / "result.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


def cmd_dissect(args: argparse.Namespace) -> int:
    from .eval.coco import CocoData
    from .eval.dissect import dissect

    if args.vqa:
        from .tasks import vqa

        adapter = vqa.load(args.model, **_placement(args))
    else:
        from .tasks import captioning

        adapter = captioning.load(args.model, **_placement(args))
    data = CocoData.load(args.instances, args.images)
    ids = sorted(data.images)[:args.limit] if args.limit else sorted(data.images)
    result = dissect(adapter, data, ids, args.layer, quantile=args.quantile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dissection.json").write_text(json.dumps(result, indent=1))
    from collections import Counter

    named = [c for c in result["channels"] if c["iou"] >= args.min_iou]
    print(f"layer {result['layer']}: {len(result['channels'])} channels over {result['images']} images; "
          f"{len(named)} with IoU >= {args.min_iou}")
    for concept, count in Counter(c["concept"] for c in named).most_common():
        best = max(c["iou"] for c in named if c["concept"] == concept)
        print(f"  {concept:<10} {count:4d} channels (best IoU {best:.2f})")
    print(f"wrote {args.out / 'dissection.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    print(f"wrote {build_report(args.result_dir, common_scale=args.common_scale)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from .data.shapes import make_image
    from .tasks.shapes_world import DEMO_SEED

    pixels, objects, _ = make_image(args.seed, seed=DEMO_SEED, size=args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    image_path = args.out / "image.png"
    Image.fromarray(pixels).save(image_path)
    print(f"shapes-world image {image_path}: " + ", ".join(f"{o.color} {o.shape}" for o in objects))
    args.caption = None
    result = _explain_caption(image_path, args, args.out)
    _print_peaks(result, objects)
    return 0


def _print_peaks(result, objects) -> None:
    """A quick look at localization: does each shape noun's map (the figure's first method) peak
    inside an object of that shape? Then the same count for every other method of the pass."""
    from .tasks.shapes_world import shape_word_peaks

    for peak in shape_word_peaks(result.words, result.maps, objects):
        where = (f"{'inside' if peak.inside else 'outside'} the {peak.word}" if peak.named
                 else f"the image has no {peak.word}")
        print(f"  map of {peak.word!r} peaks at (y={peak.y}, x={peak.x}): {where}")
    for method in result.methods[1:]:
        peaks = shape_word_peaks(result.words, result.for_method(method).maps, objects)
        print(f"  {method}: {sum(p.inside for p in peaks)} of {len(peaks)} shape nouns' maps peak inside")


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
        skip_captions=args.captions is None, function_words=not args.no_function_words,
        perturbation_questions=args.perturbation_questions, device=args.device,
        dtype=None if args.dtype == "float32" else args.dtype, workers=args.workers,
        max_targets_per_backward=args.max_targets_per_backward, prompt=args.prompt,
    )
    from .engine.device import resolve_device

    resolve_device(config.device)  # a device that is not there fails before any data is read
    summary = run_eval(config, progress=not args.quiet)
    if summary is not None:  # rank 0 (the only process outside torchrun)
        print((Path(args.out) / "summary.md").read_text())
        if args.html:
            _write_html(Path(args.out))  # the figures too
        else:
            from .report.eval_report import write_eval_plots

            write_eval_plots(Path(args.out))
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
    ask.add_argument("--method", default=None,
                     help=_method_help("; maps@METHOD in maps.npz, a method switch in the report"))
    ask.add_argument("--layer", default=None)
    ask.add_argument("--counterfactual", action="store_true", help="why not: negated gradients")
    ask.add_argument("--common-scale", action="store_true")
    ask.add_argument("--html", action="store_true", help="also write the interactive report.html")
    ask.add_argument("--explain-text", action="store_true", help="name the channels each answer rests on")
    ask.add_argument("--format", dest="formats", action="append", choices=["png", "svg", "pdf"], default=[])
    ask.add_argument("--out", type=Path, default=Path("out/vqa"))
    _add_device_options(ask)
    _add_max_targets(ask)
    ask.set_defaults(func=cmd_vqa)

    demo = commands.add_parser("demo", help="render a shapes-world image and explain its caption")
    demo.add_argument("--seed", type=int, default=8, help="which image to render")
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
    evaluate.add_argument("--prompt", default=None,
                          help="chat VLM captioners (LLaVA): the user turn's text (default: 'Describe the image.')")
    evaluate.add_argument("--method", default=None,
                          help=_method_help("; every method's maps are scored, the baselines once per word"))
    evaluate.add_argument("--layer", default=None)
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N images (by id)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--references", action="store_true", help="also explain each image's first reference caption")
    evaluate.add_argument("--synonyms", type=Path, default=None, help="extra word<TAB>category table")
    evaluate.add_argument("--sanity-images", type=int, default=0, help="model-randomization check on N images")
    evaluate.add_argument("--faithfulness-images", type=int, default=0, help="deletion/insertion AUCs on N images")
    evaluate.add_argument("--perturbation-questions", type=int, default=0,
                          help="Chefer's positive/negative perturbation AUCs of the answer on the first N questions")
    evaluate.add_argument("--no-function-words", action="store_true",
                          help="score only words with a category or color (by default every other caption word "
                               "is scored too, against the union of all objects in the image)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument("--workers", type=_non_negative_int, default=None,
                          help="processes decoding images and masks ahead of the model (default: min(4, CPUs - 1); "
                               "0: in the main process)")
    evaluate.add_argument("--html", action="store_true", help="also write report.html and the figures")
    evaluate.add_argument("--out", type=Path, required=True)
    _add_device_options(evaluate)
    _add_max_targets(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    dissection = commands.add_parser("dissect", help="name a layer's channels by the concepts they detect")
    dissection.add_argument("--instances", type=Path, required=True)
    dissection.add_argument("--images", type=Path, required=True)
    dissection.add_argument("--model", default="default")
    dissection.add_argument("--vqa", action="store_true", help="dissect the VQA model (default: the captioner)")
    dissection.add_argument("--layer", default=None)
    dissection.add_argument("--limit", type=int, default=None)
    dissection.add_argument("--quantile", type=float, default=0.99)
    dissection.add_argument("--min-iou", type=float, default=0.04)
    dissection.add_argument("--out", type=Path, default=Path("out/dissect"))
    _add_device_options(dissection)
    dissection.set_defaults(func=cmd_dissect)

    attack = commands.add_parser("adversarial", help="targeted PGD on a caption word or VQA answer, then maps")
    attack.add_argument("image")
    attack.add_argument("--word", default=None, help="caption word to change")
    attack.add_argument("--caption", default=None, help="caption (default: the model's own)")
    attack.add_argument("--question", default=None, help="attack a VQA answer to this question instead")
    attack.add_argument("--answer", default=None, help="the answer to change (default: the model's top answer)")
    attack.add_argument("--to", required=True, help="the word / answer the attack aims for")
    attack.add_argument("--eps", type=float, default=8.0, help="L-infinity budget in grey levels (of 255)")
    attack.add_argument("--steps", type=int, default=40)
    attack.add_argument("--model", default="default")
    attack.add_argument("--method", default=None, help=_method_help("; the figure shows the first"))
    attack.add_argument("--instances", type=Path, default=None, help="COCO instances describing IMAGE (for scoring)")
    attack.add_argument("--images", type=Path, default=None)
    attack.add_argument("--out", type=Path, default=Path("out/adversarial"))
    _add_device_options(attack)
    attack.set_defaults(func=cmd_adversarial)

    compare = commands.add_parser("compare", help="two captioners' word maps side by side on one image")
    compare.add_argument("model_a")
    compare.add_argument("model_b")
    compare.add_argument("image")
    compare.add_argument("--caption", default=None, help="caption to explain (default: model A's)")
    compare.add_argument("--word", action="append", default=[], help="only these words (repeatable)")
    compare.add_argument("--method", default=None, help=_method_help("; one row per model and method"))
    compare.add_argument("--out", type=Path, default=Path("out/compare"))
    _add_device_options(compare)
    compare.set_defaults(func=cmd_compare)

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
