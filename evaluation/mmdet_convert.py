"""The official GenEval detector's weights (mmdetection 2.x Mask2Former) in transformers' layout.

GenEval scores with mmdet's `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco` (Swin-S, COCO instance segmentation,
80 classes). Our scorer runs transformers' `Mask2FormerForUniversalSegmentation`; this converts that checkpoint
so the scorer uses exactly its weights:

    python -m evaluation.mmdet_convert mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth \
        --output_dir detectors/mmdet-mask2former-swin-s
    python evaluate_geneval.py RUN_DIR --detector_model detectors/mmdet-mask2former-swin-s

The architecture comes from `--config` (default facebook/mask2former-swin-small-coco-instance, the same network;
a local folder works offline). The .pth is read with `torch.load(weights_only=True)`: no code from the file runs.

Layout facts, from mmdetection v2.x and mmcv 1.x (names, shapes, orders; the code here is our own):
- detector (mmdet/models/detectors/maskformer.py): `backbone.*`, `panoptic_head.*`; `panoptic_fusion_head` has no
  weights. Config: configs/mask2former/mask2former_r50_lsj_8x2_50e_coco(-panoptic).py, swin-t / swin-s on top.
- Swin (mmdet/models/backbones/swin.py): `stages.S.blocks.B.{norm1, attn.w_msa.{qkv, proj,
  relative_position_bias_table, relative_position_index}, norm2, ffn.layers.{0.0, 1}}`, `stages.S.downsample.
  {norm, reduction}` (PatchMerging with nn.Unfold), `norm{S}` on each output; its `swin_converter` gives the
  original-Swin <-> mmdet mapping. qkv rows are [q; k; v] (reshape(B, N, 3, heads, d)).
- PatchMerging (mmcv/cnn/bricks/transformer.py): nn.Unfold(2, stride 2) orders the 4C features channel-major,
  c * 4 + (row * 2 + col); the original Swin (and transformers) concatenates [x(0,0), x(1,0), x(0,1), x(1,1)]
  (row, col offsets), i.e. (row + 2 * col) * C + c. Reduction columns and norm entries are permuted accordingly.
- FFN (mmcv): `layers.0.0` = first Linear (then activation, dropout), `layers.1` = second Linear.
- BaseTransformerLayer (mmcv): `attentions.i` in operation_order, `norms.j` in order of the 'norm' entries.
  Pixel decoder encoder: ('self_attn', 'norm', 'ffn', 'norm'); transformer decoder: ('cross_attn', 'norm',
  'self_attn', 'norm', 'ffn', 'norm'), so attentions.0 is the masked cross-attention and attentions.1 the
  self-attention. mmcv's MultiheadAttention wraps nn.MultiheadAttention as `.attn` (fused in_proj [q; k; v]).
- MSDeformAttnPixelDecoder (mmdet/models/plugins/msdeformattn_pixel_decoder.py): `input_convs.i` (ConvModule:
  `conv`, GroupNorm `gn`; i = 0 is the lowest resolution, as transformers' input_projections), `encoder.layers.l`,
  `level_encoding` (nn.Embedding), `lateral_convs.i` / `output_convs.i` (for feats[i]), `mask_feature`.
  MultiScaleDeformableAttention: `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`.
- Mask2FormerHead (mmdet/models/dense_heads/mask2former_head.py): `transformer_decoder.layers.l`,
  `transformer_decoder.post_norm` (DetrTransformerDecoder), `decoder_input_projs.i` (nn.Identity when the widths
  agree: no weights), `query_embed` (query positions), `query_feat` (query features), `level_embed`, `cls_embed`
  (num_classes + 1 outputs, no-object last), `mask_embed` (Linear, ReLU, Linear, ReLU, Linear: indices 0, 2, 4).
- Classes: mmdet/datasets/coco.py CocoDataset.CLASSES (the checkpoint's meta["CLASSES"] when present); the
  class_predictor rows are reordered to the config's id2label, matched by name.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable

import torch

from common.cli import (ArgumentParser, MissingPathError, UnwritablePathError, UsageError, hub_error,
                        looks_like_local_path, one_line, require_file, run)

from .detectors import DEFAULT_DETECTOR, geneval_name

DEFAULT_CONFIG = DEFAULT_DETECTOR  # same network: Swin-S Mask2Former, COCO instance segmentation

# mmdet/datasets/coco.py, CocoDataset.CLASSES (mmdetection v2.x): the row order of cls_embed
MMDET_COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# the config's img_norm_cfg (RGB, 0-255)
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)

SWIN = "model.pixel_level_module.encoder."
PIXEL_DECODER = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."


# ----- tensor transforms -----
def split_qkv(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused [q; k; v] projection (weight [3C, C] or bias [3C]) -> its three parts, in that order."""
    if fused.shape[0] % 3:
        raise ValueError(f"a fused q/k/v tensor needs 3 * C rows, got shape {tuple(fused.shape)}")
    return tuple(t.clone() for t in fused.chunk(3, dim=0))


def unfold_to_concat_index(channels: int) -> torch.Tensor:
    """For each feature of Swin's concatenated 2x2 patch, (row + 2 * col) * C + c, its position in nn.Unfold's
    channel-major output, c * 4 + row * 2 + col."""
    return torch.tensor([c * 4 + row * 2 + col for col in range(2) for row in range(2) for c in range(channels)])


def unfold_to_concat(tensor: torch.Tensor) -> torch.Tensor:
    """PatchMerging's reduction weight [out, 4C] (columns) or norm weight/bias [4C] from mmdet's nn.Unfold order to
    the original Swin's (and transformers') concatenation order."""
    if tensor.shape[-1] % 4:
        raise ValueError(f"a patch-merging tensor needs 4 * C features, got shape {tuple(tensor.shape)}")
    return tensor[..., unfold_to_concat_index(tensor.shape[-1] // 4)].clone()


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's [W*W, W*W] index into the relative-position table: (dy + W - 1) * (2W - 1) + (dx + W - 1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None, :] + window - 1)


def class_order(source: tuple[str, ...] | list[str], id2label: dict) -> list[int]:
    """For each target class id (0, 1, ...), the index of the same class in `source`, matched by name."""
    canonical = {geneval_name(name): i for i, name in enumerate(source)}
    target = [str(id2label[i]) for i in sorted(id2label, key=int)]
    absent = [name for name in target if geneval_name(name) not in canonical]
    repeated = len({geneval_name(name) for name in target}) != len(target)
    if absent or repeated or len(target) != len(source) or len(canonical) != len(source):
        raise ValueError(f"the config's {len(target)} classes do not match the checkpoint's {len(source)} classes "
                         f"(not in the checkpoint: {absent[:10]}, names repeated: {repeated}); pass a config whose "
                         "id2label names the checkpoint's classes (e.g. facebook/mask2former-swin-small-coco-instance "
                         "for COCO)")
    return [canonical[geneval_name(name)] for name in target]


# ----- the key mapping -----
Target = str | tuple[str, ...] | Callable[[tuple[str, ...]], str] | None
Transform = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]] | None


def _rules(config, classes) -> list[tuple[re.Pattern, Target, Transform]]:
    """(mmdet key pattern, transformers key template(s) filled with the pattern's groups, tensor transform).

    A tuple of templates takes a transform returning as many tensors; a None target drops the key after its
    transform checked it (derived buffers that transformers recomputes)."""
    window = config.backbone_config.window_size
    order = class_order(classes, config.id2label)
    order = torch.tensor(order + [len(order)])  # the no-object row stays last

    def reorder_classes(rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] != len(order):
            raise ValueError(f"cls_embed has {rows.shape[0]} rows, but the checkpoint names {len(classes)} classes "
                             "(+ no-object); pass the class names of its cls_embed rows")
        return rows[order].clone()

    def check_index(index: torch.Tensor) -> torch.Tensor:
        if not torch.equal(index.long(), relative_position_index(window)):
            raise ValueError(f"a Swin relative_position_index differs from the standard one for window {window}; "
                             "is --config's window_size that of the checkpoint?")
        return index

    block = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\."
    swin_block = SWIN + "swin.encoder.layers.{0}.blocks.{1}."
    pd, td = r"panoptic_head\.pixel_decoder\.", r"panoptic_head\.transformer_decoder\."
    wb = r"(weight|bias)"
    rules = [
        # Swin backbone
        (r"backbone\.patch_embed\.projection\." + wb, SWIN + "swin.embeddings.patch_embeddings.projection.{0}", None),
        (r"backbone\.patch_embed\.norm\." + wb, SWIN + "swin.embeddings.norm.{0}", None),
        (block + r"norm1\." + wb, swin_block + "layernorm_before.{2}", None),
        (block + r"norm2\." + wb, swin_block + "layernorm_after.{2}", None),
        (block + r"attn\.w_msa\.qkv\." + wb, tuple(swin_block + f"attention.{p}_proj.{{2}}" for p in "qkv"),
         split_qkv),
        (block + r"attn\.w_msa\.proj\." + wb, swin_block + "attention.o_proj.{2}", None),
        (block + r"attn\.w_msa\.relative_position_bias_table",
         swin_block + "attention.relative_position_bias.relative_position_bias_table", None),
        (block + r"attn\.w_msa\.relative_position_index", None, check_index),
        (block + r"ffn\.layers\.0\.0\." + wb, swin_block + "mlp.fc1.{2}", None),
        (block + r"ffn\.layers\.1\." + wb, swin_block + "mlp.fc2.{2}", None),
        (r"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
         SWIN + "swin.encoder.layers.{0}.downsample.{1}", unfold_to_concat),
        (r"backbone\.norm(\d+)\." + wb, lambda g: SWIN + f"hidden_states_norms.stage{int(g[0]) + 1}.{g[1]}", None),
        # pixel decoder (multi-scale deformable-attention encoder + one FPN level)
        (pd + r"input_convs\.(\d+)\.conv\." + wb, PIXEL_DECODER + "input_projections.{0}.0.{1}", None),
        (pd + r"input_convs\.(\d+)\.gn\." + wb, PIXEL_DECODER + "input_projections.{0}.1.{1}", None),
        (pd + r"encoder\.layers\.(\d+)\.attentions\.0\.(sampling_offsets|attention_weights|value_proj|output_proj)\."
         + wb, PIXEL_DECODER + "encoder.layers.{0}.self_attn.{1}.{2}", None),
        (pd + r"encoder\.layers\.(\d+)\.norms\.0\." + wb, PIXEL_DECODER + "encoder.layers.{0}.self_attn_layer_norm.{1}",
         None),
        (pd + r"encoder\.layers\.(\d+)\.norms\.1\." + wb, PIXEL_DECODER + "encoder.layers.{0}.final_layer_norm.{1}",
         None),
        (pd + r"encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\." + wb, PIXEL_DECODER + "encoder.layers.{0}.fc1.{1}",
         None),
        (pd + r"encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\." + wb, PIXEL_DECODER + "encoder.layers.{0}.fc2.{1}", None),
        (pd + r"level_encoding\.weight", PIXEL_DECODER + "level_embed", None),
        (pd + r"lateral_convs\.(\d+)\.conv\.weight", lambda g: PIXEL_DECODER + f"adapter_{int(g[0]) + 1}.0.weight",
         None),
        (pd + r"lateral_convs\.(\d+)\.gn\." + wb, lambda g: PIXEL_DECODER + f"adapter_{int(g[0]) + 1}.1.{g[1]}", None),
        (pd + r"output_convs\.(\d+)\.conv\.weight", lambda g: PIXEL_DECODER + f"layer_{int(g[0]) + 1}.0.weight", None),
        (pd + r"output_convs\.(\d+)\.gn\." + wb, lambda g: PIXEL_DECODER + f"layer_{int(g[0]) + 1}.1.{g[1]}", None),
        (pd + r"mask_feature\." + wb, PIXEL_DECODER + "mask_projection.{0}", None),
        # transformer decoder: attentions.0 = masked cross-attention (nn.MultiheadAttention on both sides),
        # attentions.1 = self-attention (separate q/k/v projections in transformers)
        (td + r"layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias)",
         TRANSFORMER + "decoder.layers.{0}.cross_attn.{1}", None),
        (td + r"layers\.(\d+)\.attentions\.0\.attn\.out_proj\." + wb,
         TRANSFORMER + "decoder.layers.{0}.cross_attn.out_proj.{1}", None),
        (td + r"layers\.(\d+)\.attentions\.1\.attn\.in_proj_(weight|bias)",
         tuple(TRANSFORMER + f"decoder.layers.{{0}}.self_attn.{p}_proj.{{1}}" for p in "qkv"), split_qkv),
        (td + r"layers\.(\d+)\.attentions\.1\.attn\.out_proj\." + wb,
         TRANSFORMER + "decoder.layers.{0}.self_attn.out_proj.{1}", None),
        (td + r"layers\.(\d+)\.norms\.0\." + wb, TRANSFORMER + "decoder.layers.{0}.cross_attn_layer_norm.{1}", None),
        (td + r"layers\.(\d+)\.norms\.1\." + wb, TRANSFORMER + "decoder.layers.{0}.self_attn_layer_norm.{1}", None),
        (td + r"layers\.(\d+)\.norms\.2\." + wb, TRANSFORMER + "decoder.layers.{0}.final_layer_norm.{1}", None),
        (td + r"layers\.(\d+)\.ffns\.0\.layers\.0\.0\." + wb, TRANSFORMER + "decoder.layers.{0}.fc1.{1}", None),
        (td + r"layers\.(\d+)\.ffns\.0\.layers\.1\." + wb, TRANSFORMER + "decoder.layers.{0}.fc2.{1}", None),
        (td + r"post_norm\." + wb, TRANSFORMER + "decoder.layernorm.{0}", None),
        (r"panoptic_head\.decoder_input_projs\.(\d+)\." + wb, TRANSFORMER + "input_projections.{0}.{1}", None),
        (r"panoptic_head\.query_embed\.weight", TRANSFORMER + "queries_embedder.weight", None),
        (r"panoptic_head\.query_feat\.weight", TRANSFORMER + "queries_features.weight", None),
        (r"panoptic_head\.level_embed\.weight", TRANSFORMER + "level_embed.weight", None),
        (r"panoptic_head\.mask_embed\.(0|2|4)\." + wb,
         lambda g: TRANSFORMER + f"decoder.mask_predictor.mask_embedder.{int(g[0]) // 2}.0.{g[1]}", None),
        (r"panoptic_head\.cls_embed\." + wb, "class_predictor.{0}", reorder_classes),
    ]
    return [(re.compile(pattern), target, transform) for pattern, target, transform in rules]


def _target_only(expected: dict[str, torch.Size], config) -> dict[str, torch.Tensor]:
    """transformers keys with no mmdet counterpart, by name: SwinModel's final norm (SwinBackbone never applies it;
    transformers itself ignores it when missing) and the loss's class weights (training only; mmdet keeps them as
    a plain attribute, not in the state dict)."""
    norm = SWIN + "swin.layernorm."
    empty_weight = torch.ones(config.num_labels + 1)
    empty_weight[-1] = config.no_object_weight
    values = {norm + "weight": torch.ones(expected.get(norm + "weight", (0,))),
              norm + "bias": torch.zeros(expected.get(norm + "bias", (0,))),
              "criterion.empty_weight": empty_weight}
    return {key: value for key, value in values.items() if key in expected}


def expected_state_shapes(config) -> dict[str, torch.Size]:
    """Every key and shape of the Mask2FormerForUniversalSegmentation state dict for `config` (built on the meta
    device: no memory, no initialisation)."""
    from transformers import Mask2FormerForUniversalSegmentation

    with torch.device("meta"):
        model = Mask2FormerForUniversalSegmentation(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def _show(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_mmdet_state_dict(mmdet_sd: dict[str, torch.Tensor], config,
                             classes: tuple[str, ...] | list[str] | None = None) -> dict[str, torch.Tensor]:
    """mmdet 2.x Mask2Former (Swin) state dict -> Mask2FormerForUniversalSegmentation state dict for `config`.

    `classes`: the names of cls_embed's rows (default: mmdet's COCO order). Strict: a key no rule maps, a target
    key left unfilled, a key filled twice or a shape that differs raises a ValueError listing them."""
    if getattr(config.backbone_config, "model_type", None) != "swin":
        raise ValueError(f"the config's backbone is {getattr(config.backbone_config, 'model_type', None)!r}; this "
                         "converter maps mmdet's Swin backbone (pass a Swin Mask2Former config)")
    classes = tuple(MMDET_COCO_CLASSES if classes is None else classes)
    expected = expected_state_shapes(config)
    rules = _rules(config, classes)
    converted: dict[str, torch.Tensor] = {}
    unmapped, twice = [], []
    for key, tensor in mmdet_sd.items():
        for pattern, target, transform in rules:
            match = pattern.fullmatch(key)
            if match:
                break
        else:
            unmapped.append(key)
            continue
        value = transform(tensor) if transform is not None else tensor
        if target is None:
            continue
        groups = match.groups()
        names = target if isinstance(target, tuple) else (target,)
        values = value if isinstance(target, tuple) else (value,)
        for name, part in zip(names, values):
            name = name(groups) if callable(name) else name.format(*groups)
            if name in converted:
                twice.append(name)
            converted[name] = part
    for key, value in _target_only(expected, config).items():
        converted.setdefault(key, value)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = sorted(f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k])}" for k in set(converted) & set(expected)
                    if converted[k].shape != expected[k])
    problems = [f"{what}: {_show(keys)}" for what, keys in (
        ("mmdet keys no rule maps", unmapped), ("target keys left unfilled", missing),
        ("mapped keys the model does not have", unexpected), ("target keys filled twice", twice),
        ("shape mismatches (converted vs model)", shapes)) if keys]
    if problems:
        raise ValueError("the checkpoint does not convert to this Mask2Former config: " + "; ".join(problems)
                         + " (is it mmdet 2.x's Mask2Former with a Swin backbone, and --config the same size?)")
    return converted


# ----- reading the .pth and building the model -----
def read_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...] | None]:
    """The state dict of an mmdet .pth ({"state_dict": ..., "meta": ...} or a bare state dict), read with
    weights_only=True, and the class names of its meta (None when absent)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a torch file at all
            unsafe = []
        if unsafe:
            raise UsageError(
                f"{path} needs pickle to load (it holds Python objects: {', '.join(unsafe)}), and unpickling runs code "
                "from the file; in an environment you trust, save its weights alone: python -c \"import torch; "
                f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
                "torch.save({'state_dict': c['state_dict']}, 'weights.pth')\" and convert weights.pth") from err
        raise UsageError(f"{path} could not be read as a torch checkpoint: {one_line(err)[:200]}") from err
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not state_dict or \
            not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UsageError(f"{path} holds no state dict of tensors (top level: {keys}); expected mmdet's "
                         "{'state_dict': ..., 'meta': ...}")
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    classes = meta.get("CLASSES") if isinstance(meta, dict) else None
    if not (isinstance(classes, (tuple, list)) and classes and all(isinstance(c, str) for c in classes)):
        classes = None
    return dict(state_dict), (tuple(classes) if classes else None)


def load_config(config: str | Path):
    """A Mask2FormerConfig from a hub id or a local folder (one-line UsageError when it cannot be had)."""
    from transformers import Mask2FormerConfig

    if looks_like_local_path(str(config)) and not Path(config).expanduser().exists():
        raise MissingPathError(f"--config {config} does not exist; pass a folder with a Mask2Former config.json or a "
                               f"hub id such as {DEFAULT_CONFIG}")
    try:
        return Mask2FormerConfig.from_pretrained(str(config))
    except OSError as err:
        raise hub_error(str(config), err, "--config") from err


def load_mmdet_checkpoint(path: str | Path, config=DEFAULT_CONFIG):
    """Mask2FormerForUniversalSegmentation (eval mode) holding exactly the weights of an mmdet 2.x Mask2Former .pth.

    `config`: a Mask2FormerConfig, or a hub id / local folder holding one."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    if not isinstance(config, Mask2FormerConfig):
        config = load_config(config)
    state_dict, classes = read_mmdet_checkpoint(path)
    try:
        converted = convert_mmdet_state_dict(state_dict, config, classes)
    except ValueError as err:  # a checkpoint or config of another model: the user's to fix, on one line
        raise UsageError(f"{path}: {one_line(err)}") from err
    model = Mask2FormerForUniversalSegmentation(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


# ----- CLI -----
def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m evaluation.mmdet_convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="mmdet 2.x Mask2Former .pth (e.g. GenEval's mask2former_swin-s-p4-w7-"
                                           "224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth)")
    parser.add_argument("--output_dir", required=True, help="transformers folder to write (safetensors)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="hub id or local folder with the matching Mask2FormerConfig (config.json)")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    checkpoint = require_file(args.checkpoint, "checkpoint", "pass the mmdet .pth file")
    config = load_config(args.config)
    model = load_mmdet_checkpoint(checkpoint, config)
    from transformers import Mask2FormerImageProcessor

    output_dir = Path(args.output_dir).expanduser()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)  # safetensors
        # mmdet's normalisation (the scorer reads image_mean / image_std; it resizes and pads itself)
        Mask2FormerImageProcessor(image_mean=[m / 255 for m in MMDET_MEAN], image_std=[s / 255 for s in MMDET_STD]
                                  ).save_pretrained(output_dir)
    except OSError as err:
        raise UnwritablePathError(f"--output_dir {output_dir} cannot be written: {one_line(err)}") from err
    print(f"wrote {output_dir} ({sum(p.numel() for p in model.parameters()):,} parameters from {checkpoint.name}); "
          f"score with: python evaluate_geneval.py RUN_DIR --detector_model {output_dir}")
    return output_dir


if __name__ == "__main__":
    run(main)
