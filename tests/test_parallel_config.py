import json

import pytest

from parallel_config import CONFIG_DIR, deepspeed_config


@pytest.mark.parametrize("micro", [1, 4, 8, 16])
def test_shipped_configs_are_zero2_bf16_and_take_the_cli_clipping(micro):
    path = CONFIG_DIR / f"deepspeed_bf16_batch{micro}.json"
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == 2 and raw["bf16"]["enabled"] is True
    config = deepspeed_config(path, train_batch_size=micro, max_grad_norm=0.1, gradient_accumulation_steps=2)
    assert config["gradient_clipping"] == 0.1  # not accelerate's silent 1.0
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_micro_batch_size_per_gpu"] == micro


def test_disagreements_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but --train_batch_size is 4"):
        deepspeed_config(CONFIG_DIR / "deepspeed_bf16_batch8.json", train_batch_size=4, max_grad_norm=1.0)
    fixed = json.loads((CONFIG_DIR / "deepspeed_bf16_batch4.json").read_text())
    fixed["gradient_clipping"] = 1.0
    (tmp_path / "ds.json").write_text(json.dumps(fixed))
    with pytest.raises(ValueError, match="gradient_clipping=1.0 but --max_grad_norm is 0.1"):
        deepspeed_config(tmp_path / "ds.json", train_batch_size=4, max_grad_norm=0.1)
    assert deepspeed_config(tmp_path / "ds.json", train_batch_size=4, max_grad_norm=1.0)["gradient_clipping"] == 1.0
    with pytest.raises(FileNotFoundError, match="deepspeed_bf16_batch8.json"):
        deepspeed_config(tmp_path / "absent.json", train_batch_size=4, max_grad_norm=1.0)
