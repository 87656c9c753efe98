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
