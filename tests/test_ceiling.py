"""The toy world's ceiling student (toyworld/ceiling.py): trajectory points, segments, and a run end to end."""

import pytest
import torch

from model.conventions import flux_times
from toyworld.ceiling import segment_times, sampler_times, teacher_trajectory


def test_trajectory_points_lie_on_the_euler_polyline():
    """With v(z, t) = a z + b t, the recorded points are the Euler iterates at grid times and the straight line
    between the two neighbouring iterates elsewhere (Euler is linear within a step)."""
    grid = flux_times(6, 16)
    a, b = -0.7, 0.3

    def velocity(z, t):
        return a * z + b * t

    noise = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0))
    iterates = [noise]
    for t, t_next in zip(grid[:-1], grid[1:]):
        iterates.append(iterates[-1] + (t_next - t) * velocity(iterates[-1], t))
    mid = float((grid[2] + grid[3]) / 2)
    times = [1.0, float(grid[2]), mid, 0.0]
    got = teacher_trajectory(velocity, noise, grid, times)
    torch.testing.assert_close(got[:, 0], noise)
    torch.testing.assert_close(got[:, 1], iterates[2])
    torch.testing.assert_close(got[:, 2], (iterates[2] + iterates[3]) / 2)
    torch.testing.assert_close(got[:, 3], iterates[-1])


def test_segments_are_the_samplers_steps():
    grids = sampler_times(16, None)
    times, segments = segment_times(grids)
    assert times[0] == pytest.approx(1.0) and times[-1] == 0.0 and len(times) == 5  # 2-step mid = 4-step 2nd point
    steps = {(round(times[i], 6), round(times[j], 6)) for i, j in segments}
    for grid in grids:
        for t, r in zip(grid, grid[1:]):
            assert (round(t, 6), round(r, 6)) in steps
    assert len(segments) == 1 + 2 + 4


def test_ceiling_pairs_train_and_sample(tiny_flux, tmp_path):
    """Pairs from a FLUX pipeline's own sampling step (`predict`), starting at the seeded noise; a few regression
    steps through the shared trainer; the export loads as a MeanFlow student and samples."""
    from safetensors.torch import load_file

    from model.loading import load_transformer
    from model.pipeline import FluxMeanFlowPipeline
    from toyworld.ceiling import main, make_pairs

    pairs = make_pairs(str(tiny_flux), ["a red circle", "two squares"], tmp_path / "pairs.safetensors", per_caption=2,
                       log=None, resolution=32, max_sequence_length=16)
    data = load_file(pairs)
    assert data["trajectories"].shape[:2] == (4, 5) and data["times"][-1] == 0.0
    assert data["times"][0] == pytest.approx(1.0)
    # the last point is the Euler pipeline's own 28-step output from the same noise
    gen = torch.Generator().manual_seed(0)
    noise0 = torch.randn(4, 4, 64, generator=gen)[0:1]
    torch.testing.assert_close(data["trajectories"][0, 0], noise0[0])
    out = tmp_path / "kd"
    from tests.test_training import reset_accelerate

    reset_accelerate()
    try:
        main(["--pretrained_model_name_or_path", str(tiny_flux), "--allow_unrescaled_teacher", "--pairs", str(pairs),
              "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none",
              "--dataloader_num_workers", "0", "--max_sequence_length", "16", "--resolution", "32"])
    finally:
        reset_accelerate()
    student = load_transformer(str(tiny_flux), weights_path=str(out / "transformer"), time_input_scale=1.0,
                               dual_timestep=True)
    pipe = FluxMeanFlowPipeline.from_pretrained(tiny_flux, transformer=student)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", height=32, width=32, num_inference_steps=1, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
