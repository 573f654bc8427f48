"""Tiny random Mask2Former and CLIP folders, built offline, for tests and CPU benchmarks of the GenEval scorer.

They have the layout and processors of facebook/mask2former-swin-small-coco-instance and openai/clip-vit-large-patch14
(so `evaluate_geneval.py --detector_model DIR --clip_model DIR` loads them like the real ones); only sizes differ.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# a few COCO names, spelled as COCO / Detectron2 spell them (three of them are renamed for GenEval)
TINY_CLASSES = ("person", "cat", "dog", "keyboard", "mouse", "remote", "cup", "bench")


def build_tiny_mask2former(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=12, hidden_dim=32, mask_feature_size=32,
                               feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=64, encoder_feedforward_dim=64, use_pretrained_backbone=False,
                               num_labels=len(TINY_CLASSES), id2label=dict(enumerate(TINY_CLASSES)),
                               label2id={n: i for i, n in enumerate(TINY_CLASSES)})
    output_dir = Path(output_dir)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(output_dir)
    Mask2FormerImageProcessor().save_pretrained(output_dir)
    return output_dir


def build_tiny_clip(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    from model.tiny_flux import _write_clip_tokenizer

    output_dir = Path(output_dir)
    _write_clip_tokenizer(output_dir)
    tokenizer = CLIPTokenizer.from_pretrained(output_dir)
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(
        output_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return output_dir
