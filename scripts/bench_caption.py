"""Per-word caption maps: one word, all words batched, and the per-word loop, side by side.

    python scripts/bench_caption.py                 # BLIP-base-sized random model at 384 px + the default captioner
    python scripts/bench_caption.py --skip-blip     # only the default captioner
    python scripts/bench_caption.py --skip-blip --method relevance   # or attention-gradcam, or a CAM method
    python scripts/bench_caption.py --device cuda --dtype bfloat16    # on a GPU (the card is printed)
    python scripts/bench_caption.py --family llava  # mid-sized random LLaVA at 336 px, with peak memory
    python scripts/bench_caption.py --family llava --size 7b --device cuda --dtype bfloat16   # 7B-sized, on a GPU

"One word" is a single target (one forward, one backward). "All words, batched" is our path:
one forward and one batched backward for every word ("in chunks of K": at most K targets per
backward, the memory bound). "Per-word loop" is what tools without batching do: a full forward and
backward per word. The maps of the all-word paths are checked equal (1e-5).

Peak memory (``--memory``, on by default for LLaVA) is measured for each path in a fresh process:
on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the resident set's high-water mark (VmHWM
after resetting it through /proc/self/clear_refs), both above what the loaded model and its inputs
already hold.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.tasks import captioning
from mmgradcam.engine.device import resolve_device
from mmgradcam.engine.registry import is_attention_method
from mmgradcam.tasks.captioning import word_readout, word_targets

CAPTION = "a man in a red shirt rides a bike down the street"  # 12 words
LLAVA_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for content in message['content'] %}"
                  "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ content['text'] + ' ' }}{% endif %}"
                  "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# (vision: CLIP layers, width, heads, MLP; language model: layers, width, heads, MLP; vocabulary)
LLAVA_SIZES = {"mid": ((12, 768, 12, 3072), (12, 768, 12, 2048), 32000),  # CLIP-B/14 at 336 px, a 12-layer LM
               "7b": ((24, 1024, 16, 4096), (32, 4096, 32, 11008), 32000)}  # LLaVA-1.5-7B's shapes


def blip_base_captioner(device: torch.device | str = "cpu", dtype: str | None = None):
    """A BLIP-base-sized BlipForConditionalGeneration with random weights (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(CAPTION.split()))
    words += [f"tok{i}" for i in range(30524 - len(words) - 1)] + ["[DEC]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", bos_token="[DEC]", model_max_length=512)
    torch.manual_seed(0)
    config = BlipConfig(text_config={"vocab_size": len(words), "bos_token_id": vocab["[DEC]"], "pad_token_id": 0,
                                     "sep_token_id": 3, "eos_token_id": 3})
    model = BlipForConditionalGeneration(config).eval()
    return captioning.load(model, tokenizer=tokenizer, image_processor=BlipImageProcessor(), device=device, dtype=dtype)


def llava_captioner(size: str = "mid", device: torch.device | str = "cpu",
                    dtype: str | None = None) -> captioning.Captioner:
    """A random-weight LlavaForConditionalGeneration at 336 px (CLIP tower, patch 14: 576 image
    tokens; Llama decoder) with LLaVA-1.5's chat template and an in-memory BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    (v_layers, v_dim, v_heads, v_mlp), (t_layers, t_dim, t_heads, t_mlp), vocab = LLAVA_SIZES[size]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CAPTION, "USER: Describe the image. ASSISTANT:"] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                        additional_special_tokens=["<image>"], model_max_length=4096,
                                        chat_template=LLAVA_TEMPLATE)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=v_dim, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                              num_attention_heads=v_heads, image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=vocab, hidden_size=t_dim, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                       num_attention_heads=t_heads, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    resolved = resolve_device(device)
    with torch.device(resolved):  # a 7B-sized model is built on the GPU directly
        model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    return captioning.load(model, processor, device=resolved, dtype=dtype)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it to the end


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def word_paths(captioner, image: Image.Image, caption: str, method: str = "gradcam",
               chunk: int = 4) -> tuple[dict, int, str]:
    """The ways to get the caption's word maps, each a function -> (T', h, w) layer maps:
    one word, all words batched, in chunks of ``chunk`` per backward, and the per-word loop."""
    tokens = captioner.tokenize(caption)
    inputs, _ = captioner.preprocess(image)
    model_inputs = captioner.to_device(captioner.batch_inputs(inputs["pixel_values"], [tokens]))
    per_word, _ = word_targets(tokens, captioner.text_logits_from_end, device=captioner.device)
    layer, options = captioner.resolve_layer(None), dict(captioner.layer_options)
    rows = model_inputs[getattr(captioner, "input_key", "input_ids")].shape[1]
    model_inputs.update(captioner.logit_window([tokens]))  # as the captioner's explain runs it
    if is_attention_method(method):  # the attention methods read the model's attention, not a layer
        with captioner.forward_context():
            options["attention"] = captioner.attention_graph(model_inputs)

    def run(targets: list, per_backward: int | None = None) -> torch.Tensor:
        extra = {"readout": word_readout(targets, rows)} if "attention" in options else {}
        with captioner.forward_context():
            return mg.explain(captioner.model, model_inputs, targets, layer, method, dtype=captioner.dtype,
                              max_targets_per_backward=per_backward, **options, **extra).layer_maps

    paths = dict(zip(path_labels(chunk), [lambda: run(per_word[:1]), lambda: run(per_word),
                                          lambda: run(per_word, chunk),
                                          lambda: torch.cat([run([t]) for t in per_word])]))
    where = "the attention layers" if "attention" in options else f"layer {captioner.default_layer}"
    return paths, len(per_word), where


def path_labels(chunk: int) -> list[str]:
    """The paths ``word_paths`` times, in its order."""
    return ["one word's map", "all words, batched", f"all words, chunks of {chunk}", "all words, per-word loop"]


def peak_memory_mib(family: str, path: str, args: argparse.Namespace) -> float | None:
    """``path``'s peak memory in a fresh process (see the module docstring), or None if it failed."""
    command = [sys.executable, __file__, "--family", family, "--size", args.size, "--method", args.method,
               "--device", args.device, "--dtype", args.dtype, "--chunk", str(args.chunk), "--child", path]
    # large blocks straight from mmap and back on free: the resident set then follows the live tensors
    # (glibc's heap keeps freed memory otherwise, and its fragmentation would count as this path's peak)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        print(f"  (peak memory of {path!r} not measured: {result.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(lines[-1])["peak_mib"]


def measure_peak(fn, device: torch.device) -> float:
    """MiB above what is held before ``fn`` runs, at its peak."""
    from bench_memory import MiB, reset_cpu_peak, status_kib

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    before = (status_kib("VmRSS") or 0) * 1024
    if not reset_cpu_peak():
        raise OSError("/proc/self/clear_refs cannot be written here: no CPU peak to measure")
    fn()
    return ((status_kib("VmHWM") or 0) * 1024 - before) / MiB


def bench(name: str, captioner, image: Image.Image, caption: str, repeats: int, method: str = "gradcam",
          chunk: int = 4, memory: dict | None = None) -> None:
    paths, words, where = word_paths(captioner, image, caption, method, chunk)
    one_word, batched, chunked, loop = paths.values()
    one_word()  # warm-up
    t_one, _ = timed(one_word, repeats)
    t_batched, maps_batched = timed(batched, repeats)
    t_chunked, maps_chunked = timed(chunked, repeats)
    t_loop, maps_loop = timed(loop, repeats)
    scale = max(float(maps_loop.abs().max()), 1e-12)
    difference = max(float((maps_batched - maps_loop).abs().max()), float((maps_chunked - maps_loop).abs().max()))
    print(f"\n{name}: {method}, {words} words, {where}, median of {repeats}")
    timings = [(t_one, ""), (t_batched, f"({t_batched / t_one:.2f}x one word; {t_loop / t_batched:.1f}x faster than the loop)"),
            (t_chunked, f"({t_chunked / t_one:.2f}x one word)"), (t_loop, f"({t_loop / t_one:.2f}x one word)")]
    for (label, _), (seconds, note) in zip(paths.items(), timings):
        peak = "" if memory is None or memory.get(label) is None else f"  peak {memory[label]:7.0f} MiB"
        print(f"  {label:28s} {seconds:8.2f} s{peak}   {note}")
    print(f"  max relative map difference batched / chunked vs loop: {difference / scale:.1e}")


def build(family: str, args: argparse.Namespace,
          device: torch.device) -> tuple[str, captioning.Captioner, Image.Image, str]:
    """(title, captioner, image, caption) of one benchmarked family."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8"))
    if family == "blip":
        return ("BLIP-base-sized random BlipForConditionalGeneration (384 px)", blip_base_captioner(device, args.dtype),
                photo, CAPTION)
    if family == "llava":
        shapes = LLAVA_SIZES[args.size]
        title = (f"{args.size}-sized random LlavaForConditionalGeneration (336 px, 576 image tokens; CLIP "
                 f"{shapes[0][0]}x{shapes[0][1]}, LM {shapes[1][0]}x{shapes[1][1]})")
        return title, llava_captioner(args.size, device, args.dtype), photo, CAPTION
    from mmgradcam.data.shapes import make_image

    default = captioning.load("default", device=device, dtype=args.dtype)
    pixels, _, _ = make_image(3, seed=11)
    shapes_image = Image.fromarray(pixels)
    return "default captioner (128 px)", default, shapes_image, default.generate(shapes_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", nargs="+", default=None, choices=["blip", "default", "llava"],
                        help="which models (default: blip and default)")
    parser.add_argument("--skip-blip", action="store_true", help="only the default captioner")
    parser.add_argument("--size", default="mid", choices=sorted(LLAVA_SIZES), help="LLaVA's size (--family llava)")
    parser.add_argument("--method", default="gradcam", help="one method: a CAM method, attention-gradcam or relevance")
    parser.add_argument("--chunk", type=int, default=4, help="targets per backward on the chunked path")
    parser.add_argument("--memory", choices=["on", "off", "auto", "only"], default="auto",
                        help="peak memory per path, each in a fresh process (auto: for LLaVA; only: no timings)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one path's peak memory, in this process
    args = parser.parse_args()
    device = resolve_device(args.device)
    families = args.family or (["default"] if args.skip_blip else ["blip", "default"])
    if args.child:
        _, captioner, image, caption = build(families[0], args, device)
        paths, _, _ = word_paths(captioner, image, caption, args.method, args.chunk)
        print(json.dumps({"peak_mib": measure_peak(paths[args.child], device)}))
        return
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({card}), dtype {args.dtype}, {torch.get_num_threads()} threads")
    for family in families:
        memory = None  # measured before this process builds the model (a 7B one would be there twice)
        if args.memory in ("on", "only") or (args.memory == "auto" and family == "llava"):
            memory = {label: peak_memory_mib(family, label, args) for label in path_labels(args.chunk)}
        if args.memory == "only":
            print(f"\n{family}: {args.method}, peak memory per path (MiB above the loaded model and inputs)")
            for label, peak in memory.items():
                print(f"  {label:28s} {peak:8.0f} MiB" if peak is not None else f"  {label:28s} not measured")
            continue
        title, captioner, image, caption = build(family, args, device)
        bench(title, captioner, image, caption, args.repeats, args.method, args.chunk, memory)


if __name__ == "__main__":
    main()
