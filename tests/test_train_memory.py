"""training.per_device_batch_size / gradient_checkpointing: auto, decided from free memory and the cost of a pair."""
import dataclasses

import pytest

from m3po_core.config import ConfigError, TrainingConfig, load_config
from m3po_core.errors import InputError
from m3po_core.train_memory import choose, pair_gib

AUTO = TrainingConfig(batch_size=8, per_device_batch_size="auto", gradient_checkpointing="auto")
LLAVA7B = dict(layers=32, hidden=4096, element_size=2)       # bf16
WEIGHTS_GIB = 13.2


def test_the_measured_h200_costs_come_back_at_the_measured_length():
    """The per-pair units reproduce what the H200 measured at 737-token pairs (9.45 and 0.8 GiB)."""
    assert pair_gib(737, checkpointing=False, **LLAVA7B) == pytest.approx(9.45, rel=0.01)
    assert pair_gib(737, checkpointing=True, **LLAVA7B) == pytest.approx(0.80, rel=0.01)


@pytest.mark.parametrize("card_gib, per_device, checkpointing", [
    (139.8, 8, False),   # H200: the measured best (8 x 1 without checkpointing, 1.65 s a step)
    (79.2, 4, False),    # 80 GB
    (39.4, 8, True),     # 40 GB: 2 pairs without checkpointing do not fit 80 % of what is free
])
def test_large_cards_train_without_checkpointing_and_40_gb_with_it(card_gib, per_device, checkpointing):
    choice = choose(AUTO, card_gib - WEIGHTS_GIB, tokens=587 + 256, **LLAVA7B)
    assert (choice.per_device_batch_size, choice.gradient_checkpointing) == (per_device, checkpointing)
    assert 8 % choice.per_device_batch_size == 0                      # the global batch is kept


def test_a_fixed_setting_is_kept_and_only_the_auto_one_decided():
    fixed_gc = dataclasses.replace(AUTO, gradient_checkpointing=True)
    assert choose(fixed_gc, 126.6, 843, **LLAVA7B).gradient_checkpointing is True
    fixed_b = dataclasses.replace(AUTO, per_device_batch_size=2)
    assert choose(fixed_b, 126.6, 843, **LLAVA7B).per_device_batch_size == 2
    assert choose(dataclasses.replace(AUTO, per_device_batch_size=None), 26.2, 843, **LLAVA7B).per_device_batch_size == 8


def test_a_measured_pair_cost_replaces_the_estimate():
    measured = dataclasses.replace(AUTO, pair_memory_gib=30.0)      # e.g. very long pairs, measured on the card
    choice = choose(measured, 126.6, 843, **LLAVA7B)
    assert (choice.per_device_batch_size, choice.gradient_checkpointing, choice.pair_gib) == (2, False, 30.0)


def test_on_a_cpu_auto_is_the_whole_batch_without_checkpointing():
    choice = choose(dataclasses.replace(AUTO, num_processes=2), None, 843, **LLAVA7B)
    assert (choice.per_device_batch_size, choice.gradient_checkpointing) == (4, False)


def test_a_pair_that_fits_nowhere_is_refused_naming_its_length():
    with pytest.raises(InputError, match="one pair of 4000 tokens"):
        choose(AUTO, 3.0, 4000, **LLAVA7B)


def test_auto_loads_from_yaml_and_a_wrong_value_names_the_key():
    cfg = load_config("configs/llava15-7b.yaml")
    assert cfg.training.per_device_batch_size == "auto" and cfg.training.gradient_checkpointing == "auto"
    assert load_config(None, ["training.per_device_batch_size=2"]).training.per_device_batch_size == 2
    with pytest.raises(ConfigError, match="training.gradient_checkpointing"):
        load_config(None, ["training.gradient_checkpointing=sometimes"])
    with pytest.raises(ConfigError, match="training.pair_memory_gib"):
        load_config(None, ["training.pair_memory_gib=-1"])
