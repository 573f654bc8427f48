"""Build a complete, randomly initialised FLUX pipeline offline (for tests, benchmarks and CPU demos).

The folder has the diffusers layout of a real FLUX checkpoint (transformer, vae, CLIP and T5 encoders with
their tokenizers, a dynamically shifted flow-match scheduler), so every entry script loads it through the
same `--pretrained_model_name_or_path` code path as FLUX.1-lite-8B. Only the sizes differ.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections import Counter
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Words the tokenizers are trained on, so that prompts of the GenEval kind become short, meaningful token
# sequences instead of runs of unknown tokens.
_EXTRA_WORDS = (
    "a an the photo of and with left right above below next to on in front behind one two three four five six "
    "seven eight nine ten red orange yellow green blue purple pink brown black white gray grey circle square "
    "triangle star cross ring diamond hexagon heart shape small large big tiny picture image painting drawing "
    "circles squares triangles stars crosses rings diamonds hexagons hearts shapes top bottom middle center"
)


@dataclass(frozen=True)
class TinyFluxSize:
    """Dimensions of a tiny FLUX; `small` is big enough for CPU benchmark numbers to mean something."""

    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_dim: int
    vae_channels: tuple[int, int, int, int]


SIZES = {
    "tiny": TinyFluxSize(1, 1, 2, 16, (4, 6, 6), 32, (8, 8, 16, 16)),
    "small": TinyFluxSize(2, 4, 6, 32, (8, 12, 12), 64, (16, 16, 32, 32)),
}


def _corpus_words() -> list[tuple[str, int]]:
    """Lower-case words of the GenEval prompts plus a shape/colour word list, most frequent first."""
    prompts = Path(__file__).resolve().parent.parent / "evaluation" / "generation_prompts.txt"
    text = (prompts.read_text() if prompts.exists() else "") + " " + _EXTRA_WORDS
    counts = Counter(re.findall(r"[a-z]+", text.lower()))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _learn_bpe(words: list[tuple[str, int]], max_merges: int = 4000) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: the largest pair).

    Training words end with CLIP's `</w>` marker; merges learned this way re-segment every training word
    into a single token when applied in rank order, as CLIP's tokenizer does.
    """
    segmented = {tuple(word[:-1]) + (word[-1] + "</w>",): count for word, count in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged = {}
        for symbols, count in segmented.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        segmented = merged
    return merges


def _write_clip_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer in CLIP's vocab.json + merges.txt format, trained on the corpus words.

    The vocabulary is the 256 byte symbols, each also with CLIP's end-of-word marker `</w>`, plus the merges
    of `_learn_bpe`, so known words become single tokens and any text stays encodable. No hash-ordered
    trainer is involved, so the files are identical on every run.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    merges = _learn_bpe(_corpus_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {"model_max_length": 77, "bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", **config}))
    # Round-trip through transformers so the folder holds the files the installed version expects.
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)


def _write_t5_tokenizer(folder: Path) -> None:
    """A Unigram (sentencepiece-style) tokenizer.json with T5's special tokens <pad>=0, </s>=1, <unk>=2.

    Pieces are the corpus words (scored by log-frequency) and single characters (scored low), so known words
    are single tokens; deterministic like the CLIP tokenizer above.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    words = _corpus_words()
    total = sum(count for _, count in words)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, round(math.log(count / total), 4)) for word, count in words]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\u2581"))
    pieces += [(c, -20.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"model_max_length": 512, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", **config, "extra_ids": 0}))
    T5Tokenizer.from_pretrained(folder).save_pretrained(folder)


def build_components(dims: TinyFluxSize, seed: int = 0) -> dict:
    """Randomly initialised FLUX components of the given dimensions (the kwargs of FluxPipeline)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_clip_tokenizer(tmp / "tokenizer")
        _write_t5_tokenizer(tmp / "tokenizer_2")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        tokenizer_2 = T5Tokenizer.from_pretrained(tmp / "tokenizer_2")

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=dims.num_layers,
        num_single_layers=dims.num_single_layers,
        attention_head_dim=dims.attention_head_dim,
        num_attention_heads=dims.num_attention_heads,
        joint_attention_dim=dims.text_dim,
        pooled_projection_dim=dims.text_dim,
        guidance_embeds=True,
        axes_dims_rope=dims.axes_dims_rope,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=dims.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.text_dim,
        intermediate_size=2 * dims.text_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=dims.text_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=dims.text_dim,
        d_kv=dims.text_dim // 2,
        d_ff=2 * dims.text_dim,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(clip_config), tokenizer=tokenizer,
                text_encoder_2=T5EncoderModel(t5_config), tokenizer_2=tokenizer_2, transformer=transformer)


def build_tiny_flux(output_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random FLUX pipeline of the given size to `output_dir`; deterministic for a given seed."""
    from diffusers import FluxPipeline

    if size not in SIZES:
        raise ValueError(f"--size {size!r} is unknown; choose one of {sorted(SIZES)}")
    output_dir = Path(output_dir)
    FluxPipeline(**build_components(SIZES[size], seed)).save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

