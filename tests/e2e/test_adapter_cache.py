"""The worker's adapter LRU on the real model: one base copy, adapters swapped by name, evicted
beyond capacity, and the base's own output back once adapters are off or gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from shared.registry import DEFAULT_MODEL_ID, ModelEntry, ModelRegistry
from workers.adapter_cache import AdapterCache, AdapterUnavailable
from workers.batch_engine import generate_alone
from workers.model_loader import load_model

pytestmark = pytest.mark.e2e

PARAMS = {"prompt": "The capital of France is", "max_new_tokens": 6, "temperature": 0}


def _random_adapter(loaded, folder: Path, seed: int) -> Path:
    """Save a LoRA adapter with random (non-zero) weights: it changes the output at once."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(loaded.model, config)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # give the shared base its own modules back
    return folder


@pytest.fixture(scope="module")
def loaded(model_cache_dir: Path):
    return load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), model_cache_dir, torch.device("cpu"))


def test_adapters_swap_on_one_base_and_evict_beyond_capacity(loaded, tmp_path):
    base_text = generate_alone(loaded, PARAMS).text
    first = _random_adapter(loaded, tmp_path / "a", seed=1)
    second = _random_adapter(loaded, tmp_path / "b", seed=2)
    base_weights = loaded.model.get_input_embeddings().weight
    cache = AdapterCache(capacity=1)

    with cache.applied(loaded, "ft-a", first) as model:
        text_a = generate_alone(model, PARAMS).text
        # The adapter sits on the same base tensors: no copy of the weights was made.
        assert model.model.get_input_embeddings().weight is base_weights
    with cache.applied(loaded, None) as model:
        assert generate_alone(model, PARAMS).text == base_text  # adapters are off for base jobs
    with cache.applied(loaded, "ft-b", second) as model:
        text_b = generate_alone(model, PARAMS).text
    assert len({base_text, text_a, text_b}) == 3
    assert cache.loaded_ids() == ["ft-b"]  # capacity 1: ft-a was evicted
    with cache.applied(loaded, "ft-a", first) as model:
        assert generate_alone(model, PARAMS).text == text_a  # reloaded from its files, same output
    assert cache.loaded_ids() == ["ft-a"]

    cache.forget("ft-a")  # deleted: the last step used it, so it goes with the next step without it
    assert cache.loaded_ids() == ["ft-a"]
    with cache.applied(loaded, None) as model:
        assert generate_alone(model, PARAMS).text == base_text
    assert cache.loaded_ids() == []
    assert generate_alone(loaded, PARAMS).text == base_text  # no adapter left: the base has its own modules back
    with pytest.raises(AdapterUnavailable) as raised:
        with cache.applied(loaded, "ft-gone", tmp_path / "missing"):
            pass
    assert "ft-gone" in str(raised.value) and str(tmp_path) not in str(raised.value)  # clients see it


def test_each_base_models_batch_keeps_its_adapter_in_use(loaded, model_cache_dir, tmp_path):
    """A worker with two base models runs an engine per base: a step of one must not release
    (to a delete or to eviction) the adapter that the other's batch is running on."""
    entry = ModelEntry(id="second-base", path=model_cache_dir / DEFAULT_MODEL_ID)
    other = load_model(entry, model_cache_dir, torch.device("cpu"))  # the same weights, its own copy
    first = _random_adapter(loaded, tmp_path / "a", seed=1)
    second = _random_adapter(other, tmp_path / "b", seed=2)
    cache = AdapterCache(capacity=1)
    with cache.applied(loaded, "ft-a", first):
        pass
    with cache.applied(other, None):
        pass
    cache.forget("ft-a")  # deleted while the first base's batch runs on it
    assert cache.loaded_ids() == ["ft-a"]
    with cache.applied(loaded, None):  # that batch moved on
        pass
    assert cache.loaded_ids() == []

    with cache.applied(loaded, "ft-a", first):
        pass
    with cache.applied(other, "ft-b", second):  # capacity 1, but ft-a's batch still runs on it
        pass
    assert sorted(cache.loaded_ids()) == ["ft-a", "ft-b"]
    with cache.applied(loaded, None):  # ft-a's batch moved on: the next load evicts down to capacity
        pass
    with cache.applied(other, "ft-b", second) as model:
        assert generate_alone(model, PARAMS).text
    assert cache.loaded_ids() == ["ft-b"]


def test_an_adapter_deleted_while_its_batch_runs_serves_that_batch_to_the_end(loaded, tmp_path):
    """The next job of a deleted adapter unloads it (`forget`); a job already in the batch ran
    on, reloaded from files the delete had removed, and failed."""
    from workers.batch_engine import BatchEngine

    adapter = _random_adapter(loaded, tmp_path / "a", seed=4)
    engine = BatchEngine(loaded, max_batch=2, adapters=AdapterCache(capacity=2))
    running = engine.submit({**PARAMS, "max_new_tokens": 10}, adapter_id="ft-a", adapter_path=adapter)
    engine.step()
    shutil.rmtree(adapter)  # what the delete does to its files
    engine.adapters.forget("ft-a")  # what a later job of the deleted adapter does
    while not running.done.is_set():
        engine.step()
    assert len(running.result().token_ids) == 10
    after = engine.submit(PARAMS)  # the batch moves on to the base: the adapter goes
    while not after.done.is_set():
        engine.step()
    assert engine.adapters.loaded_ids() == []


def test_a_job_waiting_for_another_adapter_stops_at_once_when_cancelled(loaded, tmp_path):
    from workers.batch_engine import BatchEngine

    adapter = _random_adapter(loaded, tmp_path / "a", seed=3)
    engine = BatchEngine(loaded, max_batch=4, adapters=AdapterCache(capacity=2))
    running = engine.submit({**PARAMS, "max_new_tokens": 40}, adapter_id="ft-a", adapter_path=adapter)
    cancelled = []
    waiting = engine.submit(PARAMS, should_stop=lambda: bool(cancelled))  # the base model: waits for ft-a to drain
    engine.step()
    engine.step()
    assert engine.active == [running] and list(engine.waiting) == [waiting]
    cancelled.append(True)
    engine.step()
    assert waiting.done.is_set() and not running.done.is_set()
    output = waiting.result()
    assert (output.token_ids, output.prompt_tokens, output.text) == ([], 0, "")  # never ran, charged nothing
    while not running.done.is_set():
        engine.step()
    assert len(running.result().token_ids) == 40
    engine.adapters.forget("ft-a")  # the base model is shared with the next tests: its own modules back
    after = engine.submit(PARAMS)
    while not after.done.is_set():
        engine.step()
    assert engine.adapters.loaded_ids() == []


def test_an_adapter_that_fails_to_load_leaves_the_base_model_as_it_was(loaded, tmp_path):
    """peft injects an adapter's layers before it reads their weights: a missing or corrupt file
    left them on the shared base (base jobs ran through them, later wrappers carried them), and a
    corrupt one failed its job as `internal_error`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def injected() -> int:
        return sum(isinstance(module, BaseTunerLayer) for module in loaded.model.modules())

    base_text = generate_alone(loaded, PARAMS).text
    good = _random_adapter(loaded, tmp_path / "good", seed=5)
    missing = shutil.copytree(good, tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    corrupt = shutil.copytree(good, tmp_path / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cache = AdapterCache(capacity=4)
    for name, folder in (("ft-missing", missing), ("ft-corrupt", corrupt)):
        with pytest.raises(AdapterUnavailable, match=name):
            with cache.applied(loaded, name, folder):
                pass
        assert injected() == 0 and not hasattr(loaded.model, "peft_config")
        assert generate_alone(loaded, PARAMS).text == base_text
    # Beside an adapter in use, the failed one's layers go and the other's stay.
    with cache.applied(loaded, "ft-good", good) as model:
        good_text = generate_alone(model, PARAMS).text
    with pytest.raises(AdapterUnavailable, match="ft-corrupt"):
        with cache.applied(loaded, "ft-corrupt", corrupt):
            pass
    with cache.applied(loaded, "ft-good", good) as model:
        assert list(model.model.peft_config) == ["ft-good"] and generate_alone(model, PARAMS).text == good_text
    with cache.applied(loaded, None) as model:
        assert generate_alone(model, PARAMS).text == base_text
    cache.forget("ft-good")
    assert cache.loaded_ids() == [] and injected() == 0


def test_one_base_models_step_does_not_wait_for_anothers(loaded, model_cache_dir, tmp_path):
    """The cache held one lock over every base model's whole step: on a worker serving two
    models, one engine's step (a long prefill, a stalled stream write) held up the other's."""
    import threading

    other = load_model(ModelEntry(id="second-base", path=model_cache_dir / DEFAULT_MODEL_ID), model_cache_dir,
                       torch.device("cpu"))
    first, third = _random_adapter(loaded, tmp_path / "a", seed=6), _random_adapter(loaded, tmp_path / "c", seed=7)
    cache = AdapterCache(capacity=4)
    with cache.applied(loaded, "ft-c", third):
        pass
    inside, release = threading.Event(), threading.Event()

    def a_long_step() -> None:
        with cache.applied(loaded, "ft-a", first):
            inside.set()
            release.wait(60)

    holder = threading.Thread(target=a_long_step)
    holder.start()
    try:
        assert inside.wait(60)
        other_text = []

        def other_step() -> None:
            with cache.applied(other, None) as model:
                other_text.append(generate_alone(model, PARAMS).text)

        stepper = threading.Thread(target=other_step, daemon=True)
        stepper.start()
        stepper.join(60)
        assert other_text, "the other base model's step waited for the first's"
        cache.forget("ft-c")  # not in use, but its base model is mid-step: it goes after that step
        assert sorted(cache.loaded_ids()) == ["ft-a", "ft-c"]
    finally:
        release.set()
        holder.join()
    with cache.applied(loaded, None) as model:
        assert cache.loaded_ids() == ["ft-a"] and generate_alone(model, PARAMS).text
    cache.forget("ft-a")
    with cache.applied(loaded, None):
        pass
    assert cache.loaded_ids() == []
