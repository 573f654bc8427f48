"""Strict loading from diffusers folders, safetensors and the reference's {"module": state_dict} .pt files."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from model.loading import CheckpointMismatchError, load_transformer, read_state_dict


@pytest.fixture(scope="module")
def x1_weights(tiny_flux):
    """A distinct x1 state dict (the original weights, perturbed), standing in for a rescaled checkpoint."""
    sd = load_transformer(str(tiny_flux)).state_dict()
    return {k: v + 0.01 for k, v in sd.items()}


def assert_same_weights(model, state_dict):
    got = model.state_dict()
    assert set(got) == set(state_dict)
    assert all(torch.equal(got[k], state_dict[k]) for k in state_dict)


def test_reference_pt_format_loads_strictly(tiny_flux, x1_weights, tmp_path):
    path = tmp_path / "rescaled.pt"
    torch.save({"module": x1_weights}, path)
    model = load_transformer(str(tiny_flux), weights_path=path, time_input_scale=1.0)
    assert model.config.time_input_scale == 1.0
    assert_same_weights(model, x1_weights)


def test_safetensors_file_and_folder_load(tiny_flux, x1_weights, tmp_path):
    save_file(x1_weights, tmp_path / "w.safetensors")
    assert_same_weights(load_transformer(str(tiny_flux), weights_path=tmp_path / "w.safetensors"), x1_weights)
    model = load_transformer(str(tiny_flux), weights_path=tmp_path / "w.safetensors")
    model.save_pretrained(tmp_path / "export")
    assert_same_weights(load_transformer(str(tmp_path / "export"), subfolder=None), x1_weights)
    assert_same_weights(load_transformer(str(tiny_flux), weights_path=tmp_path / "export"), x1_weights)


def test_missing_and_unexpected_keys_are_errors_that_list_them(tiny_flux, x1_weights, tmp_path):
    missing = dict(x1_weights)
    del missing["proj_out.bias"]
    torch.save({"module": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointMismatchError, match="missing keys: proj_out.bias"):
        load_transformer(str(tiny_flux), weights_path=tmp_path / "missing.pt")
    extra = {**x1_weights, "not_a_layer.weight": torch.zeros(1)}
    torch.save({"module": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: not_a_layer.weight"):
        load_transformer(str(tiny_flux), weights_path=tmp_path / "extra.pt")
    shapes = {**x1_weights, "proj_out.bias": torch.zeros(3)}
    torch.save({"module": shapes}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_transformer(str(tiny_flux), weights_path=tmp_path / "shape.pt")


def test_dual_timestep_allowance_only_for_the_second_embedder(tiny_flux, x1_weights, tmp_path):
    torch.save({"module": x1_weights}, tmp_path / "teacher.pt")
    student = load_transformer(str(tiny_flux), weights_path=tmp_path / "teacher.pt", time_input_scale=1.0,
                               dual_timestep=True)
    emb = student.time_text_embed.timestep_embedder
    assert torch.equal(student.timestep_embedder2.linear_2.weight, emb.linear_2.weight)
    # a MeanFlow student's own checkpoint (with timestep_embedder2) round-trips exactly
    with torch.no_grad():
        student.timestep_embedder2.linear_2.weight.mul_(3)
    torch.save({"module": student.state_dict()}, tmp_path / "student.pt")
    again = load_transformer(str(tiny_flux), weights_path=tmp_path / "student.pt", dual_timestep=True)
    assert_same_weights(again, student.state_dict())
    # ...and is refused by a single-timestep loader instead of silently dropping keys
    with pytest.raises(CheckpointMismatchError, match="dual-timestep"):
        load_transformer(str(tiny_flux), weights_path=tmp_path / "student.pt")


def test_pickled_objects_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"module": Payload()}, f)
    with pytest.raises(ValueError, match="pickled Python objects"):
        read_state_dict(path)


def test_module_prefix_and_non_state_dicts(tmp_path, x1_weights):
    torch.save({"module." + k: v for k, v in x1_weights.items()}, tmp_path / "ddp.pt")
    assert set(read_state_dict(tmp_path / "ddp.pt")) == set(x1_weights)
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        read_state_dict(tmp_path / "weights.npz")


def test_a_checkpoint_with_aliased_tensors_loads_into_parameters_that_own_their_storage(tiny_flux, x1_weights, tmp_path):
    """The reference's MeanFlow students alias timestep_embedder2 with the time embedder (METHODS 8.12); torch.save
    keeps that sharing. Loaded, every parameter must own its storage, or training one would change the other."""
    state = dict(x1_weights)
    prefix = "time_text_embed.timestep_embedder."
    for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        state["timestep_embedder2." + name] = state[prefix + name]  # the same tensor: shared storage
    path = tmp_path / "reference_meanflow.pt"
    torch.save({"module": state}, path)
    raw = read_state_dict(path)  # the precondition: the file itself shares storage
    assert raw["timestep_embedder2.linear_1.weight"].data_ptr() == raw[prefix + "linear_1.weight"].data_ptr()

    student = load_transformer(str(tiny_flux), weights_path=path, time_input_scale=1.0, dual_timestep=True)
    assert_same_weights(student, state)
    pointers = [p.untyped_storage().data_ptr() for p in student.parameters()]
    assert len(set(pointers)) == len(pointers)
    with torch.no_grad():
        student.timestep_embedder2.linear_1.weight.add_(1.0)
    assert torch.equal(student.time_text_embed.timestep_embedder.linear_1.weight, state[prefix + "linear_1.weight"])
