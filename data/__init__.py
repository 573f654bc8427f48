"""Data loading for FLUX few-step distillation: text-image datasets and a synthetic generator."""

from .dataset import (
    PromptDataset,
    TextImageDataset,
    add_dataset_args,
    build_dataloader,
    collate_text_image,
    load_text_image_dataset,
    normalize_caption,
    preprocess_image,
    validate_resolution,
)

__all__ = [
    "PromptDataset",
    "TextImageDataset",
    "add_dataset_args",
    "build_dataloader",
    "collate_text_image",
    "load_text_image_dataset",
    "make_synthetic_dataset",
    "normalize_caption",
    "preprocess_image",
    "validate_resolution",
]


def __getattr__(name: str):
    """Import `make_synthetic_dataset` lazily, so `python -m data.synthetic` runs without a double import."""
    if name == "make_synthetic_dataset":
        from .synthetic import make_synthetic_dataset

        return make_synthetic_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
