"""The mmdet 2.x Mask2Former -> transformers converter (evaluation/mmdet_convert.py) on a tiny Swin Mask2Former.

The mmdet-layout state dict is written here from mmdet's own description (module names and shapes of
mmdet/models/backbones/swin.py, mmcv's PatchMerging / FFN / BaseTransformerLayer / MultiheadAttention /
MultiScaleDeformableAttention, MSDeformAttnPixelDecoder, Mask2FormerHead), not by inverting the converter; the
transforms are checked by running mmdet's computations by hand against transformers' modules.
"""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import mmdet_convert as M

WINDOW, EMBED, DEPTHS, HEADS = 7, 16, (2, 2, 2, 2), (1, 2, 2, 4)
FEAT, MASK_DIM, ATTN_HEADS, QUERIES = 32, 32, 2, 8
ENC_LAYERS, ENC_FFN, DEC_LAYERS, DEC_FFN = 2, 48, 2, 64  # DEC_LAYERS mmdet layers (= HF decoder_layers - 1)


def tiny_config(id2label=None):
    from transformers import Mask2FormerConfig, SwinConfig

    id2label = id2label or dict(enumerate(M.MMDET_COCO_CLASSES))
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=EMBED, depths=list(DEPTHS), num_heads=list(HEADS),
                          window_size=WINDOW, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, num_queries=QUERIES, hidden_dim=FEAT, feature_size=FEAT,
                             mask_feature_size=MASK_DIM, encoder_layers=ENC_LAYERS, encoder_feedforward_dim=ENC_FFN,
                             decoder_layers=DEC_LAYERS + 1, dim_feedforward=DEC_FFN, num_attention_heads=ATTN_HEADS,
                             use_pretrained_backbone=False, num_labels=len(id2label), id2label=id2label,
                             label2id={n: i for i, n in id2label.items()})


def mmdet_rel_index(window: int) -> torch.Tensor:
    """WindowMSA's buffer as mmdet builds it: double_step_seq(2W - 1, W, 1, W), plus its transpose, flipped."""
    coords = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None]
              + torch.arange(window)[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def mmdet_layout(num_classes: int = 80) -> dict[str, tuple]:
    """Key -> shape of mmdet's Mask2Former (Swin backbone, MSDeformAttn pixel decoder, 3 levels, one FPN level)."""
    shapes = {"backbone.patch_embed.projection.weight": (EMBED, 3, 4, 4),
              "backbone.patch_embed.projection.bias": (EMBED,),
              "backbone.patch_embed.norm.weight": (EMBED,), "backbone.patch_embed.norm.bias": (EMBED,)}
    dims = [EMBED * 2 ** s for s in range(4)]
    for s, (dim, depth, heads) in enumerate(zip(dims, DEPTHS, HEADS)):
        for b in range(depth):
            p = f"backbone.stages.{s}.blocks.{b}."
            shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                           p + "attn.w_msa.relative_position_bias_table": ((2 * WINDOW - 1) ** 2, heads),
                           p + "attn.w_msa.relative_position_index": "index",
                           p + "attn.w_msa.qkv.weight": (3 * dim, dim), p + "attn.w_msa.qkv.bias": (3 * dim,),
                           p + "attn.w_msa.proj.weight": (dim, dim), p + "attn.w_msa.proj.bias": (dim,),
                           p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                           p + "ffn.layers.0.0.weight": (4 * dim, dim), p + "ffn.layers.0.0.bias": (4 * dim,),
                           p + "ffn.layers.1.weight": (dim, 4 * dim), p + "ffn.layers.1.bias": (dim,)})
        if s < 3:
            p = f"backbone.stages.{s}.downsample."
            shapes.update({p + "norm.weight": (4 * dim,), p + "norm.bias": (4 * dim,),
                           p + "reduction.weight": (2 * dim, 4 * dim)})
        shapes.update({f"backbone.norm{s}.weight": (dim,), f"backbone.norm{s}.bias": (dim,)})
    pd = "panoptic_head.pixel_decoder."
    for i, level in enumerate((3, 2, 1)):  # input_convs[0] takes the lowest resolution
        shapes.update({pd + f"input_convs.{i}.conv.weight": (FEAT, dims[level], 1, 1),
                       pd + f"input_convs.{i}.conv.bias": (FEAT,),
                       pd + f"input_convs.{i}.gn.weight": (FEAT,), pd + f"input_convs.{i}.gn.bias": (FEAT,)})
    for layer in range(ENC_LAYERS):
        p = pd + f"encoder.layers.{layer}."
        shapes.update({p + "attentions.0.sampling_offsets.weight": (ATTN_HEADS * 3 * 4 * 2, FEAT),
                       p + "attentions.0.sampling_offsets.bias": (ATTN_HEADS * 3 * 4 * 2,),
                       p + "attentions.0.attention_weights.weight": (ATTN_HEADS * 3 * 4, FEAT),
                       p + "attentions.0.attention_weights.bias": (ATTN_HEADS * 3 * 4,),
                       p + "attentions.0.value_proj.weight": (FEAT, FEAT), p + "attentions.0.value_proj.bias": (FEAT,),
                       p + "attentions.0.output_proj.weight": (FEAT, FEAT),
                       p + "attentions.0.output_proj.bias": (FEAT,),
                       p + "ffns.0.layers.0.0.weight": (ENC_FFN, FEAT), p + "ffns.0.layers.0.0.bias": (ENC_FFN,),
                       p + "ffns.0.layers.1.weight": (FEAT, ENC_FFN), p + "ffns.0.layers.1.bias": (FEAT,)})
        for n in range(2):
            shapes.update({p + f"norms.{n}.weight": (FEAT,), p + f"norms.{n}.bias": (FEAT,)})
    shapes.update({pd + "level_encoding.weight": (3, FEAT),
                   pd + "lateral_convs.0.conv.weight": (FEAT, dims[0], 1, 1),  # bias=False: it has a norm
                   pd + "lateral_convs.0.gn.weight": (FEAT,), pd + "lateral_convs.0.gn.bias": (FEAT,),
                   pd + "output_convs.0.conv.weight": (FEAT, FEAT, 3, 3),
                   pd + "output_convs.0.gn.weight": (FEAT,), pd + "output_convs.0.gn.bias": (FEAT,),
                   pd + "mask_feature.weight": (MASK_DIM, FEAT, 1, 1), pd + "mask_feature.bias": (MASK_DIM,)})
    td = "panoptic_head.transformer_decoder."
    for layer in range(DEC_LAYERS):
        p = td + f"layers.{layer}."
        for a in range(2):  # attentions.0 = cross_attn, attentions.1 = self_attn
            shapes.update({p + f"attentions.{a}.attn.in_proj_weight": (3 * FEAT, FEAT),
                           p + f"attentions.{a}.attn.in_proj_bias": (3 * FEAT,),
                           p + f"attentions.{a}.attn.out_proj.weight": (FEAT, FEAT),
                           p + f"attentions.{a}.attn.out_proj.bias": (FEAT,)})
        for n in range(3):
            shapes.update({p + f"norms.{n}.weight": (FEAT,), p + f"norms.{n}.bias": (FEAT,)})
        shapes.update({p + "ffns.0.layers.0.0.weight": (DEC_FFN, FEAT), p + "ffns.0.layers.0.0.bias": (DEC_FFN,),
                       p + "ffns.0.layers.1.weight": (FEAT, DEC_FFN), p + "ffns.0.layers.1.bias": (FEAT,)})
    h = "panoptic_head."
    shapes.update({td + "post_norm.weight": (FEAT,), td + "post_norm.bias": (FEAT,),
                   h + "query_embed.weight": (QUERIES, FEAT), h + "query_feat.weight": (QUERIES, FEAT),
                   h + "level_embed.weight": (3, FEAT),
                   h + "cls_embed.weight": (num_classes + 1, FEAT), h + "cls_embed.bias": (num_classes + 1,),
                   h + "mask_embed.0.weight": (FEAT, FEAT), h + "mask_embed.0.bias": (FEAT,),
                   h + "mask_embed.2.weight": (FEAT, FEAT), h + "mask_embed.2.bias": (FEAT,),
                   h + "mask_embed.4.weight": (MASK_DIM, FEAT), h + "mask_embed.4.bias": (MASK_DIM,)})
    return shapes


def mmdet_state_dict(seed: int = 0, num_classes: int = 80) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: mmdet_rel_index(WINDOW) if shape == "index" else 0.2 * torch.randn(shape, generator=g)
            for k, shape in mmdet_layout(num_classes).items()}


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def mmdet_sd():
    return mmdet_state_dict()


@pytest.fixture(scope="module")
def converted(mmdet_sd, config):
    return M.convert_mmdet_state_dict(mmdet_sd, config)


@pytest.fixture(scope="module")
def model(converted, config):
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    model.load_state_dict(converted, strict=True)
    return model


# (1) every key mapped, every target key filled
def test_conversion_loads_strictly_and_runs(converted, config, model, mmdet_sd):
    from transformers import Mask2FormerForUniversalSegmentation

    fresh = Mask2FormerForUniversalSegmentation(config)
    result = fresh.load_state_dict(converted)  # strict: a missing or unexpected key raises, listing them
    assert result.missing_keys == [] and result.unexpected_keys == []
    # plain renames carry the tensors unchanged
    for src, dst in [("panoptic_head.query_feat.weight", "model.transformer_module.queries_features.weight"),
                     ("panoptic_head.query_embed.weight", "model.transformer_module.queries_embedder.weight"),
                     ("panoptic_head.pixel_decoder.level_encoding.weight",
                      "model.pixel_level_module.decoder.level_embed"),
                     ("panoptic_head.pixel_decoder.lateral_convs.0.conv.weight",
                      "model.pixel_level_module.decoder.adapter_1.0.weight"),
                     ("panoptic_head.mask_embed.4.weight",
                      "model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight"),
                     ("panoptic_head.transformer_decoder.post_norm.weight",
                      "model.transformer_module.decoder.layernorm.weight"),
                     ("backbone.norm3.bias", "model.pixel_level_module.encoder.hidden_states_norms.stage4.bias"),
                     ("panoptic_head.transformer_decoder.layers.1.attentions.0.attn.in_proj_weight",
                      "model.transformer_module.decoder.layers.1.cross_attn.in_proj_weight"),
                     ("panoptic_head.transformer_decoder.layers.1.norms.0.weight",
                      "model.transformer_module.decoder.layers.1.cross_attn_layer_norm.weight"),
                     ("panoptic_head.transformer_decoder.layers.1.norms.1.weight",
                      "model.transformer_module.decoder.layers.1.self_attn_layer_norm.weight")]:
        assert torch.equal(converted[dst], mmdet_sd[src]), (src, dst)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 64, 96))
    assert out.class_queries_logits.shape == (1, QUERIES, 81) and torch.isfinite(out.masks_queries_logits).all()


# (2) the transforms, checked by running mmdet's computation by hand
def test_unfold_patch_merging_equals_transformers_patch_merging(model, mmdet_sd):
    from transformers.models.swin.modeling_swin import SwinPatchMerging

    stage, dim, height, width = 1, 2 * EMBED, 6, 10
    p = f"backbone.stages.{stage}.downsample."
    norm_w, norm_b, reduction = (mmdet_sd[p + n] for n in ("norm.weight", "norm.bias", "reduction.weight"))
    x = torch.randn(2, height * width, dim, generator=torch.Generator().manual_seed(1))

    # mmcv PatchMerging.forward: (B, H*W, C) -> (B, C, H, W) -> nn.Unfold(2, stride 2) -> (B, L, 4C) -> norm -> reduce
    unfolded = torch.nn.Unfold(kernel_size=2, stride=2)(x.view(2, height, width, dim).permute(0, 3, 1, 2))
    expected = F.layer_norm(unfolded.transpose(1, 2), (4 * dim,), norm_w, norm_b) @ reduction.T

    converted_merge = model.model.pixel_level_module.encoder.swin.encoder.layers[stage].downsample
    with torch.no_grad():
        assert torch.allclose(converted_merge(x, (height, width)), expected, atol=1e-5)
        raw = SwinPatchMerging(dim)  # the weights as mmdet stores them, unpermuted: a different function
        raw.load_state_dict({"norm.weight": norm_w, "norm.bias": norm_b, "reduction.weight": reduction})
        assert not torch.allclose(raw(x, (height, width)), expected, atol=1e-2)


def test_fused_window_attention_split_equals_mmdet_window_msa(model, mmdet_sd):
    stage, block = 2, 1
    dim, heads, n = EMBED * 2 ** stage, HEADS[stage], WINDOW * WINDOW
    p = f"backbone.stages.{stage}.blocks.{block}.attn.w_msa."
    x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(2))

    # mmdet WindowMSA.forward (no shift mask)
    qkv = (x @ mmdet_sd[p + "qkv.weight"].T + mmdet_sd[p + "qkv.bias"]).reshape(3, n, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
    table = mmdet_sd[p + "relative_position_bias_table"]
    bias = table[mmdet_sd[p + "relative_position_index"].view(-1)].view(n, n, heads).permute(2, 0, 1)
    out = (attn + bias).softmax(-1) @ v
    expected = out.transpose(1, 2).reshape(3, n, dim) @ mmdet_sd[p + "proj.weight"].T + mmdet_sd[p + "proj.bias"]

    attention = model.model.pixel_level_module.encoder.swin.encoder.layers[stage].blocks[block].attention
    with torch.no_grad():
        assert torch.allclose(attention(x)[0], expected, atol=1e-5)
    assert torch.equal(mmdet_rel_index(WINDOW), M.relative_position_index(WINDOW))


def test_decoder_self_attention_equals_multihead_attention_with_in_proj(model, mmdet_sd):
    p = "panoptic_head.transformer_decoder.layers.1.attentions.1.attn."
    mha = torch.nn.MultiheadAttention(FEAT, ATTN_HEADS)
    mha.load_state_dict({name: mmdet_sd[p + name]
                         for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
    g = torch.Generator().manual_seed(3)
    x, pos = torch.randn(QUERIES, 2, FEAT, generator=g), torch.randn(QUERIES, 2, FEAT, generator=g)
    self_attn = model.model.transformer_module.decoder.layers[1].self_attn
    with torch.no_grad():
        # mmcv BaseTransformerLayer 'self_attn': key = value = query; query_pos added to query and key, not value
        expected = mha(x + pos, x + pos, x)[0]
        assert torch.allclose(self_attn(hidden_states=x, position_embeddings=pos)[0], expected, atol=1e-5)


def test_class_rows_follow_the_configs_id2label(mmdet_sd, converted):
    names = list(M.MMDET_COCO_CLASSES)
    random.Random(0).shuffle(names)
    shuffled = M.convert_mmdet_state_dict(mmdet_sd, tiny_config(dict(enumerate(names))))
    weight, bias = mmdet_sd["panoptic_head.cls_embed.weight"], mmdet_sd["panoptic_head.cls_embed.bias"]
    for i, name in enumerate(names):
        j = M.MMDET_COCO_CLASSES.index(name)
        assert torch.equal(shuffled["class_predictor.weight"][i], weight[j])
        assert shuffled["class_predictor.bias"][i] == bias[j]
    assert torch.equal(shuffled["class_predictor.weight"][80], weight[80])  # no-object stays last
    assert torch.equal(converted["class_predictor.weight"], weight)  # same order: unchanged
    with pytest.raises(ValueError, match="LABEL_0"):
        M.convert_mmdet_state_dict(mmdet_sd, tiny_config({i: f"LABEL_{i}" for i in range(80)}))


# (3) strict: an unmapped key, a missing key
def test_unmapped_and_missing_keys_raise_naming_them(mmdet_sd, config):
    extra = {**mmdet_sd, "panoptic_head.loss_cls.something": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"no rule maps: panoptic_head\.loss_cls\.something"):
        M.convert_mmdet_state_dict(extra, config)
    missing = {k: v for k, v in mmdet_sd.items() if k != "panoptic_head.query_feat.weight"}
    with pytest.raises(ValueError, match=r"unfilled: model\.transformer_module\.queries_features\.weight"):
        M.convert_mmdet_state_dict(missing, config)
    wrong_index = {**mmdet_sd, "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index":
                   M.relative_position_index(WINDOW).T.contiguous()}
    with pytest.raises(ValueError, match="relative_position_index"):
        M.convert_mmdet_state_dict(wrong_index, config)
    panoptic = {**mmdet_sd, **{k: v for k, v in mmdet_state_dict(num_classes=133).items() if "cls_embed" in k}}
    with pytest.raises(ValueError, match="cls_embed has 134 rows"):  # not silently cut to 81 rows
        M.convert_mmdet_state_dict(panoptic, config)


# (4) a .pth that needs pickle is refused, and none of its code runs
TRIPPED = []


def _trip():
    TRIPPED.append(True)
    return "tripped"


class Tripwire:
    def __reduce__(self):
        return (_trip, ())


@pytest.mark.parametrize("obj", [Tripwire(), np.float64(0.5)], ids=["object", "numpy-scalar"])
def test_pickled_objects_are_refused_with_one_line(tmp_path, mmdet_sd, config, obj):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": mmdet_sd, "meta": {"CLASSES": M.MMDET_COCO_CLASSES, "hook_msgs": {"x": obj}}}, path)
    TRIPPED.clear()
    with pytest.raises(ValueError) as err:
        M.load_mmdet_checkpoint(path, config)
    assert not TRIPPED
    message = str(err.value)
    assert "\n" not in message and "needs pickle" in message and "weights_only=False" in message


# (5) the CLI writes a folder transformers loads, with the converted weights
def test_cli_writes_a_folder_transformers_loads(tmp_path, mmdet_sd, config, converted, capsys):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    config.save_pretrained(tmp_path / "config")
    pth = tmp_path / "mask2former.pth"
    torch.save({"state_dict": mmdet_sd, "meta": {"CLASSES": M.MMDET_COCO_CLASSES, "iter": 368750}}, pth)
    out = M.main([str(pth), "--output_dir", str(tmp_path / "out"), "--config", str(tmp_path / "config")])
    assert (out / "model.safetensors").is_file() and "evaluate_geneval.py" in capsys.readouterr().out

    loaded = Mask2FormerForUniversalSegmentation.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(loaded) == set(converted)
    assert all(torch.equal(loaded[k], converted[k]) for k in converted)
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    assert processor.image_std == pytest.approx([0.229, 0.224, 0.225], abs=1e-6)


def test_cli_errors_are_one_line(tmp_path, config, capsys):
    from common.cli import run

    config.save_pretrained(tmp_path / "config")
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}}, tmp_path / "m.pth")
    for argv in ([str(tmp_path / "absent.pth"), "--output_dir", str(tmp_path / "o")],
                 [str(tmp_path / "m.pth"), "--output_dir", str(tmp_path / "o"), "--config", str(tmp_path / "no_cfg")],
                 [str(tmp_path / "m.pth"), "--output_dir", str(tmp_path / "o"), "--config", str(tmp_path / "config")]):
        with pytest.raises(SystemExit) as exit_:
            run(M.main, argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and "error:" in err
    assert "no rule maps: backbone.x" in err
