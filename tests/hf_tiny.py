"""Tiny random-weight transformers models with in-memory tokenizers and processors (no hub)."""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["a red circle to the left of a blue square", "two green triangles above a yellow star",
          "a photo of a dog on a couch", "what color is the circle ?", "how many circles are there ?"]
# words that the WordPiece vocabulary splits into several tokens ("circles" -> circle ##s)
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "circle", "to", "the", "left", "of",
             "blue", "square", "two", "green", "triangle", "above", "yellow", "star", "photo", "dog", "on", "couch",
             "what", "color", "is", "how", "many", "are", "there", "?", ",", ".", "yes", "no", "one", "##s", "tri",
             "##angle", "##ang", "##le", "sq", "##uare"]


def wordpiece_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDPIECE)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    extra = {"bos_token": "[DEC]"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64, **extra)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer trained on a few sentences."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=64)


def tiny_blip(image_size: int = 32, vqa: bool = False):
    import torch
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering,
                              BlipImageProcessor)

    torch.manual_seed(0)
    tokenizer = wordpiece_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    text = dict(vocab_size=len(WORDPIECE), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=40,
                bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), pad_token_id=0,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(vision_config=vision, text_config=text)
    model = (BlipForQuestionAnswering if vqa else BlipForConditionalGeneration)(config).eval()
    processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def tiny_git(image_size: int = 32):
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM

    torch.manual_seed(0)
    tokenizer = wordpiece_tokenizer(bos=False)
    config = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=image_size, patch_size=8),
                       vocab_size=len(WORDPIECE), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=40, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GitForCausalLM(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def tiny_vit_gpt2(image_size: int = 32):
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel,
                              VisionEncoderDecoderModel)

    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    encoder = ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=40, n_embd=32, n_layer=2, n_head=2,
                                         add_cross_attention=True, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


ANSWERS = ["red", "blue", "yes", "no", "one", "two", "circle", "square"]


def tiny_vilt(max_image_length: int = -1):
    import torch
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor

    torch.manual_seed(0)
    tokenizer = wordpiece_tokenizer(bos=False)
    config = ViltConfig(vocab_size=len(WORDPIECE), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, image_size=64, patch_size=8, max_position_embeddings=40,
                        max_image_length=max_image_length, num_labels=len(ANSWERS),
                        id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)})
    model = ViltForQuestionAnswering(config).eval()
    processor = ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8)
    return model, tokenizer, processor


# LLaVA-1.5's chat template (llava-hf), without its {% generation %} markers
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
                  "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                  "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
                  "'text') %}{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def tiny_llava(image_size: int = 56, patch_size: int = 14, vision_layers: int = 3, seed: int = 0):
    """A tiny LLaVA-1.5: CLIP vision tower, Llama decoder, the byte-level BPE tokenizer with
    ``<image>`` as an added special token and LLaVA's chat template, LlavaProcessor with a CLIP
    image processor (resize the short side, center crop). Returns (model, processor)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.model_max_length = 512
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    return model, processor


def gemma_tokenizer(special: list[str] = (), **named: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Gemma's special tokens (``<pad>``, ``<eos>``, ``<bos>``, which
    it adds in front like Gemma's), ``special`` as added special tokens and ``named`` as named ones
    (e.g. ``image_token="<image_soft_token>"``)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", *special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((CORPUS + ["caption en", "answer en"]) * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=512, add_bos_token=True,
                                   extra_special_tokens=dict(named) if named else None)


def words_only(model, tokenizer) -> None:
    """Random weights generate bytes and special tokens; limit the tiny model's generation to tokens
    that are letters (EOS included in the suppressed ones), so generated captions and answers have words."""
    keep = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isalpha()
            and i not in tokenizer.all_special_ids and not tokenizer.convert_ids_to_tokens(i).startswith("<")]
    model.generation_config.suppress_tokens = sorted(set(range(model.config.get_text_config().vocab_size)) - set(keep))


def tiny_paligemma(image_size: int = 84, patch_size: int = 14, seed: int = 0):
    """A tiny PaliGemma: SigLIP vision tower (no head), Gemma decoder, the BPE tokenizer with Gemma's
    BOS, PaliGemmaProcessor (adds ``<image>``, places BOS and the prefix's "\\n") with a SigLIP
    image processor (square resize, aspect ratio not kept). Returns (model, processor)."""
    import torch
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                             projection_dim=32, hidden_size=32)
    model = PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    words_only(model, tokenizer)
    return model, processor


# Gemma 3's chat template (its layout; the system-prompt and alternation checks left out)
GEMMA3_TEMPLATE = ("{{ bos_token }}{%- for message in messages -%}"
                   "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
                   "{{ '<start_of_turn>' + role + '\n' }}"
                   "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
                   "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
                   "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
                   "{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
                   "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def tiny_gemma3(image_size: int = 112, patch_size: int = 14, tokens_per_image: int = 16, seed: int = 0):
    """A tiny Gemma 3: SigLIP vision tower (8x8 patches at 112 px), the projector's average pooling
    to ``tokens_per_image`` soft tokens (4x4: kernel 2), a Gemma 3 decoder with a sliding and a full
    attention layer, the BPE tokenizer with Gemma 3's turn and image tokens and its chat template,
    Gemma3Processor with Gemma3ImageProcessor (square resize, pan-and-scan off). Returns (model, processor)."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer(["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                                 "<image_soft_token>"], boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                image_token="<image_soft_token>")
    tokenizer.chat_template = GEMMA3_TEMPLATE
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=tokens_per_image)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                            sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image,
                          image_token_index=tokenizer.image_token_id, boi_token_index=tokenizer.boi_token_id,
                          eoi_token_index=tokenizer.eoi_token_id)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initializes the projection to zeros: no image would reach the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    words_only(model, tokenizer)
    return model, processor


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: BPE over "▁"-marked words (Metaspace, the space attached to the
    next word, one in front of the text), ``<s>`` / ``</s>`` / ``<unk>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator((CORPUS + ["A short image description:"]) * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=512)


def tiny_blip2(instruct: bool = False, text: str = "opt", image_size: int = 42, patch_size: int = 14,
               query_tokens: int = 4, seed: int = 0):
    """A tiny BLIP-2 (or InstructBLIP): BLIP vision encoder (CLS + patches), a 2-layer Q-Former with
    ``query_tokens`` queries cross-attending every layer, an OPT decoder with the byte-level BPE tokenizer or a
    Llama one with the SentencePiece-style tokenizer (a BOS in front, like OPT's and Llama's), the real Blip2Processor /
    InstructBlipProcessor (WordPiece Q-Former tokenizer) with a BLIP image processor (square resize,
    aspect ratio not kept). Returns (model, processor)."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              LlamaConfig, OPTConfig)

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer() if text == "opt" else sentencepiece_tokenizer()
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    tokenizer.model_max_length = 512
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    # the processor adds "<image>" to the tokenizer, as for the hub's checkpoints
    if instruct:
        processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          qformer_tokenizer=wordpiece_tokenizer(bos=False),
                                          num_query_tokens=query_tokens)
    else:
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=query_tokens)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   cross_attention_frequency=1, encoder_hidden_size=32, vocab_size=len(WORDPIECE),
                   max_position_embeddings=64, pad_token_id=0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), max_position_embeddings=256)
    if text == "opt":
        lm = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                       **ids)
    else:
        lm = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, **ids)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if instruct:
        config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=lm.to_dict(),
                                    num_query_tokens=query_tokens, image_token_index=image_token)
        model = InstructBlipForConditionalGeneration(config).eval()
    else:
        config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=lm.to_dict(),
                             num_query_tokens=query_tokens, image_token_index=image_token)
        model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    words_only(model, tokenizer)
    # BLIP-2's generate runs the language model's own generate, with the language model's generation config
    model.language_model.generation_config.suppress_tokens = model.generation_config.suppress_tokens
    return model, processor


# Qwen2-VL's / Qwen2.5-VL's chat template (the default system turn, the image as
# <|vision_start|><|image_pad|><|vision_end|>, ChatML turns), without its video and vision-id parts
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                 "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
                 "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
                 "<|im_end|>\n{% else %}{% for content in message['content'] %}"
                 "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
                 "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_qwen2_vl(version: str = "2", window_size: int = 56, seed: int = 0):
    """A tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``): a 2-block vision tower (patch 14,
    2x2 merger; 2.5: window attention in block 0 with windows of ``window_size`` px, full attention
    in block 1), a 2-layer Qwen2 decoder with M-RoPE, the byte-level BPE tokenizer with Qwen's special
    tokens and chat template, and the family's processor with Qwen2VLImageProcessor (smart_resize
    between 56x56 and 112x112 pixels, so images stay tiny). Returns (model, processor)."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    tokenizer.bos_token = None  # Qwen's tokenizer has no BOS
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.model_max_length = 1024
    ids = tokenizer.convert_tokens_to_ids
    # head_dim 8: M-RoPE splits its 4 frequencies into temporal, height and width sections
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=32)
        prefix = "Qwen2VL"
    elif version == "2.5":
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=window_size, fullatt_block_indexes=[1])
        prefix = "Qwen2_5_VL"
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ids("<|im_end|>")
    words_only(model, tokenizer)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = getattr(transformers, f"{prefix}Processor")(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_TEMPLATE)
    return model, processor


# LLaVA-OneVision's chat template (ChatML turns, the image as "<image>\n" before the text), its video and
# system-prompt parts left out
ONEVISION_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                      "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                      "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', "
                      "'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# tiles of 28 px (4x4 patches of 7 px): a wide, a tall and a square any-resolution grid
ANYRES_PINPOINTS = [[28, 56], [56, 28], [28, 84], [84, 28], [56, 56]]


def tiny_llava_next(onevision: bool = False, tile: int = 28, patch_size: int = 7, vision_layers: int = 3,
                    pinpoints: list | None = None, max_tiles: int = 9, seed: int = 0):
    """A tiny LLaVA-NeXT (CLIP tower with CLS, Llama decoder, LLaVA's template, ``<image>``,
    vision_feature_layer -2, CLS dropped) or LLaVA-OneVision (``onevision``: SigLIP tower without CLS,
    Qwen2 decoder, ChatML template, vision_feature_layer -1, "full" features, the tile grid
    downsampled above ``max_tiles`` tiles' worth of tokens, ``anyres_max_<max_tiles>``), with the family's real
    image processor and processor: tiles of ``tile`` px and any-resolution grids ``pinpoints``
    (default ANYRES_PINPOINTS). Returns (model, processor)."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

    torch.manual_seed(seed)
    pinpoints = [list(p) for p in (pinpoints or ANYRES_PINPOINTS)]
    tokenizer = bpe_tokenizer()
    special = ["<image>", "<|im_start|>", "<|im_end|>"] if onevision else ["<image>"]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    template = ONEVISION_TEMPLATE if onevision else LLAVA_TEMPLATE
    tokenizer.chat_template = template
    tokenizer.model_max_length = 512
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                  image_size=tile, patch_size=patch_size)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if onevision:
        aspect = f"anyres_max_{max_tiles}"
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision).to_dict(),
                                      text_config=Qwen2Config(**text).to_dict(), image_token_index=image_token,
                                      image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", vision_aspect_ratio=aspect)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        image_processor = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile},
                                                       image_grid_pinpoints=pinpoints)
        processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=LlavaOnevisionVideoProcessor(),
                                            num_image_tokens=(tile // patch_size) ** 2,
                                            vision_feature_select_strategy="full", vision_aspect_ratio=aspect,
                                            chat_template=template)
    else:
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision).to_dict(),
                                 text_config=LlamaConfig(**text).to_dict(), image_token_index=image_token,
                                 image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(config).eval()
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": tile},
                                                  crop_size={"height": tile, "width": tile},
                                                  image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=template)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    words_only(model, tokenizer)
    return model, processor

FLORENCE_TASKS = ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>", "<OCR>"]


def tiny_florence2(image_size: int = 64, seed: int = 0):
    """A tiny Florence-2: a 2-stage DaViT (patch embeddings of stride 4 and 2: an 8x8 last stage at
    64 px; 3 blocks in stage 0, 2 in the last, so the longest stage is not the last), the projector
    (2-D position embeddings, a pooled token before the grid: 1 + 64 image tokens), a 2+2-layer BART,
    a byte-level BPE tokenizer with BART's special tokens (``<s> text </s>``), ``<image>`` and
    Florence-2's task tokens, and the real Florence2Processor with a CLIP image processor resizing
    to a square without keeping the aspect ratio (as Florence-2's, at 768 px). Returns (model, processor)."""
    import torch
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<image>",
                                                                  *FLORENCE_TASKS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((CORPUS + ["What does the image describe?"]) * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=1024,
                                        extra_special_tokens={"image_token": "<image>"},
                                        additional_special_tokens=FLORENCE_TASKS)
    vision = Florence2VisionConfig(depths=[3, 2], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2],
                                   num_groups=[2, 2], window_size=4, projection_dim=32, max_position_embeddings=16,
                                   max_temporal_embeddings=4, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=160, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_bos_token_id=0)
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config.forced_bos_token_id = tokenizer.bos_token_id  # as Florence-2's: </s> <s> text </s>
    words_only(model, tokenizer)
    # <s> is forced after the decoder's start (a token suppressed throughout cannot be); elsewhere it is biased away
    model.generation_config.suppress_tokens.remove(tokenizer.bos_token_id)
    model.generation_config.sequence_bias = [[[tokenizer.bos_token_id], -100.0]]
    model.generation_config.forced_eos_token_id = None  # suppressed: captions run to max_new_tokens
    side = image_size // 8  # strides 4 and 2
    image_processor = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    image_processor.image_seq_length = 1 + side * side
    return model, Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)


# Idefics3's / SmolVLM's chat template (the image as <image>, "User:" / "Assistant:" turns ending in
# <end_of_utterance>), with the tokenizer's BOS in front
IDEFICS3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
                     "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                     "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                     "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                     "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
IDEFICS3_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]]


def tiny_idefics3(family: str = "idefics3", tile: int = 32, longest_edge: int = 64, splitting: bool = True,
                  seed: int = 0):
    """A tiny Idefics3 (``family="idefics3"``) or SmolVLM (``"smolvlm"``): a 2-block SigLIP-style
    vision model on ``tile`` px tiles (patch 8: a 4x4 patch grid), the connector's 2x2 pixel shuffle
    (4 image tokens per view), a 2-layer Llama decoder, the byte-level BPE tokenizer with the family's
    special tokens and chat template, and the family's processor (the longest edge resized to
    ``longest_edge``, tiles of ``tile`` px). Returns (model, processor)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIAL})
    tokenizer.eos_token = "<end_of_utterance>"
    tokenizer.chat_template = IDEFICS3_TEMPLATE
    tokenizer.model_max_length = 1024
    ids = tokenizer.convert_tokens_to_ids
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=ids("<end_of_utterance>"),
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=tile, patch_size=8)
    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, scale_factor=2,
                                                      image_token_id=ids("<image>"),
                                                      pad_token_id=tokenizer.pad_token_id)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ids("<end_of_utterance>")
    words_only(model, tokenizer)
    sizes = dict(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                 do_image_splitting=splitting)
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(**sizes)
    extra = {"video_processor": transformers.SmolVLMVideoProcessor()} if family == "smolvlm" else {}
    processor = getattr(transformers, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tokenizer,
                                                           image_seq_len=(tile // 8 // 2) ** 2,
                                                           chat_template=IDEFICS3_TEMPLATE, **extra)
    return model, processor


def save_tiny(directory, built) -> "object":
    """Save a tiny (model, processor) pair with ``save_pretrained`` into ``directory`` (loaded by
    path in the family tests, as a user's local copy would be)."""
    model, processor = built
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
