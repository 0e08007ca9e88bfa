"""Build the demo model and demo adapters into a folder, from lorafleet.demo.recipe.

Steps: a random GQA Llama with the demo tokenizer (tiny_models.build_tiny_model), trained
briefly on the embedded corpus; then, on that base, one PEFT LoRA adapter per recipe entry,
trained to answer its example prompts. Deterministic: fixed seeds, full-batch training,
deterministic algorithms and a fixed thread count, so the same machine rebuilds the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from lorafleet.demo import recipe as R
from lorafleet.demo.corpus import CORPUS
from lorafleet.demo.tiny_models import build_tiny_model, normalize_adapter_config
from lorafleet.demo.training import corpus_sequences, example_sequences, train

# Thread count changes the order of float reductions, and so the trained bytes; keep it fixed.
BUILD_THREADS = 2
# Written into each adapter_config.json instead of the (temporary) folder the base was built in.
DEMO_BASE_NAME = "lorafleet/demo-base"


def build_demo_assets(
    out_dir: Path,
    report: Callable[[str], None],
    base: R.BaseModelRecipe = R.BASE,
    adapters: Sequence[R.AdapterRecipe] = R.ADAPTERS,
) -> None:
    """Write `out_dir/model/` (HF model folder) and `out_dir/adapters/<id>/` for each adapter.
    `base` and `adapters` default to the demo recipe (tests pass smaller ones)."""
    import transformers

    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        torch.set_num_threads(BUILD_THREADS)
        torch.use_deterministic_algorithms(True)
        # fork_rng: the caller's global RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            model_dir = _build_base(out_dir / "model", base, report)
            for adapter in adapters:
                _build_adapter(model_dir, out_dir / "adapters" / adapter.adapter_id, adapter, report)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
        transformers.utils.logging.enable_progress_bar()


def _build_base(model_dir: Path, b: R.BaseModelRecipe, report: Callable[[str], None]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(
        f"demo base model: llama hidden {b.hidden_size}, {b.num_layers} layers, "
        f"{b.num_heads} heads / {b.num_kv_heads} kv heads, training {b.train_steps} steps on the CPU"
    )
    build_tiny_model(
        model_dir,
        arch="llama",
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_layers=b.num_layers,
        num_heads=b.num_heads,
        num_kv_heads=b.num_kv_heads,
        vocab_size=b.vocab_size,
        max_position=b.max_position,
        seed=b.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # The whole paragraph is learned, so labels equal the inputs (HF shifts them by one).
    rows = [(ids, ids) for ids in corpus_sequences(tokenizer, CORPUS)]
    torch.manual_seed(b.seed)
    train(model, rows, steps=b.train_steps, learning_rate=b.learning_rate, report=report, label="base")
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return model_dir


def _build_adapter(model_dir: Path, adapter_dir: Path, adapter: R.AdapterRecipe, report) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(
        f"demo adapter {adapter.adapter_id}: rank {adapter.r}, modules {','.join(adapter.target_modules)}"
        f"{', rslora' if adapter.use_rslora else ''}, training {adapter.train_steps} steps"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        target_modules=list(adapter.target_modules),
        use_rslora=adapter.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(adapter.seed)  # PEFT draws lora_A's initial values from the global RNG
    model = get_peft_model(base, config)
    rows = example_sequences(tokenizer, adapter.examples)
    train(model, rows, steps=adapter.train_steps, learning_rate=adapter.learning_rate, report=report, label=adapter.adapter_id)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    # The build folder is temporary and differs per build: keep its path out of the files.
    normalize_adapter_config(adapter_dir, base_model_name=DEMO_BASE_NAME)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card, also naming the path
