"""Teacher rescaling: the remapped initialisation's math, a short run that improves agreement, and strict reuse."""

import math

import pytest
import torch

from model.rescale import RescaleConfig, remapped_embedder_input, sample_flow_times
from model.transformer import sinusoidal_embedding


def test_remapped_embedder_reindexes_frequencies_exactly():
    """x1 channel j at tau equals x1000 channel j + 96 at tau: with the 96 fastest columns zero, W' phi(tau) =
    W phi(1000 tau) exactly; otherwise the difference is their contribution minus its mean over the range."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 256, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    tau = torch.linspace(0, 1, 20001, dtype=torch.float64)
    original = sinusoidal_embedding(1000 * tau) @ weight.T + bias

    slow_only = weight.clone()
    slow_only[:, :96] = 0
    slow_only[:, 128:224] = 0
    w1, b1 = remapped_embedder_input(slow_only, bias, 0.0, 1.0)
    assert torch.allclose(sinusoidal_embedding(tau) @ w1.T + b1, sinusoidal_embedding(1000 * tau) @ slow_only.T + bias,
                          atol=1e-9)

    w2, b2 = remapped_embedder_input(weight, bias, 0.0, 1.0)
    remapped = sinusoidal_embedding(tau) @ w2.T + b2
    # the lost channels oscillate around the mean that moved into the bias: the average difference vanishes
    assert (remapped - original).mean(0).abs().max() < 1e-3
    assert (remapped - original).abs().max() > 1e-2  # but the function is not reproduced pointwise (METHODS 2.2)
    # without the bias correction the average difference would not vanish
    assert (remapped - b2 + bias - original).mean(0).abs().max() > 0.1


def test_remap_refuses_scales_without_an_exact_reindexing():
    with pytest.raises(ValueError, match="no exact re-indexing"):
        remapped_embedder_input(torch.zeros(2, 256), torch.zeros(2), 0, 1, scale=500.0)


def test_time_mixture_covers_the_unit_interval():
    cfg = RescaleConfig()
    tau = sample_flow_times(20000, 1024, cfg, torch.Generator().manual_seed(0))
    assert tau.dtype == torch.float32 and 0 < tau.min() and tau.max() < 1
    hist = torch.histc(tau, bins=10, min=0, max=1) / len(tau)
    assert hist.min() > 0.03  # every tenth of [0, 1] is visited
    only_uniform = sample_flow_times(20000, 1024, RescaleConfig(time_mixture={"uniform": 1.0}),
                                     torch.Generator().manual_seed(0))
    assert abs(only_uniform.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError):
        RescaleConfig(time_mixture={"gamma": 1.0})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_images=8, resolution=32, seed=2)


def common_args(tiny_flux, dataset, out):
    return ["--pretrained_model_name_or_path", str(tiny_flux), "--dataset_name", str(dataset), "--resolution", "32",
            "--train_batch_size", "4", "--max_sequence_length", "16", "--dataloader_num_workers", "0",
            "--report_to", "none", "--output_dir", str(out), "--seed", "0"]


def test_short_rescaling_run_improves_agreement_and_loads_strictly(tiny_flux, dataset, tmp_path):
    import train_rescale
    from tests.test_training import reset_accelerate

    flags = common_args(tiny_flux, dataset, tmp_path / "r") + ["--eval_steps", "6", "--eval_batches", "1"]
    reset_accelerate()
    before = train_rescale.main(flags + ["--eval_only"])
    reset_accelerate()
    after = train_rescale.main(flags + ["--max_train_steps", "40", "--checkpointing_steps", "0",
                                        "--learning_rate", "3e-4", "--lr_warmup_steps", "0", "--rescale_loss", "mse"])
    reset_accelerate()

    def mean_error(report):
        return sum(err for _, _, err in report["velocity_error_by_time"]) / len(report["velocity_error_by_time"])

    assert mean_error(after) < 0.9 * mean_error(before)
    assert after["image_psnr_db"] > before["image_psnr_db"]
    rescaled = tmp_path / "r" / "rescaled.pt"
    state = torch.load(rescaled, map_location="cpu", weights_only=True)
    assert set(state) == {"module"}

    import train_meanflow
    import train_sCM
    from training import Trainer

    for module, cls, extra in ((train_sCM, train_sCM.SCM, []), (train_meanflow, train_meanflow.MeanFlow, [])):
        reset_accelerate()
        argv = common_args(tiny_flux, dataset, tmp_path / cls.name) + [
            "--rescaled_checkpoint_path", str(rescaled), "--max_train_steps", "1", "--checkpointing_steps", "0"] + extra
        args = module.parse_args(argv)
        method = cls(args)
        Trainer(args, method).train()
        reset_accelerate()
    # and the x1 teacher is not the x1000 one: the rescaled weights were really used
    from model.loading import load_transformer

    loaded = load_transformer(str(tiny_flux), weights_path=rescaled, time_input_scale=1.0)
    original = load_transformer(str(tiny_flux))
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))
    assert math.isfinite(after["latent_rmse"])
