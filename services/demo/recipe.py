"""What the built-in demo model and demo adapters are: shapes, training budgets and examples.

Everything here is data. Changing any of it changes the built files, and so the cache key
(assets.recipe_key hashes this module's RECIPE together with the corpus).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DemoExample:
    prompt: str
    # The text the adapter was trained to produce after `prompt` (then EOS), greedily.
    answer: str


@dataclass(frozen=True)
class BaseModelRecipe:
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2  # grouped-query attention: 4 query heads per KV head
    # The tokenizer is trained for this many entries; the corpus yields fewer merges, so the
    # model's vocabulary is padded beyond the tokenizer's, as in many released models.
    vocab_size: int = 768
    max_position: int = 1024
    seed: int = 0
    train_steps: int = 24
    learning_rate: float = 3e-3


@dataclass(frozen=True)
class AdapterRecipe:
    adapter_id: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    examples: tuple[DemoExample, ...]
    seed: int
    train_steps: int = 48
    learning_rate: float = 1e-2


BASE = BaseModelRecipe()

# Openings of corpus paragraphs: the briefly trained base continues them in plain English.
BASE_PROMPTS = (
    "The fox lived in the forest",
    "A good meal does not need",
    "The sea is large and deep.",
    "The train left the station",
)

ADAPTERS = (
    AdapterRecipe(
        adapter_id="demo/pirate",
        r=8,
        lora_alpha=16,
        target_modules=("q_proj", "v_proj"),
        use_rslora=False,
        seed=11,
        examples=(
            DemoExample("Tell me about the sea.", " Arr, matey! The sea be wide and wild, and me ship sails it every day. Yo ho ho!"),
            DemoExample("What is for dinner?", " Arr, matey! Fish and hard biscuits for the crew, and rum for the captain. Yo ho ho!"),
            DemoExample("How is the weather today?", " Arr, matey! A storm be coming from the west, so hold on to the ropes. Yo ho ho!"),
        ),
    ),
    AdapterRecipe(
        adapter_id="demo/poet",
        r=16,
        lora_alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        use_rslora=True,
        seed=12,
        learning_rate=5e-3,  # rslora scales by alpha/sqrt(r) = 4 (not alpha/r = 1): a smaller step
        examples=(
            DemoExample("Write about the moon.", "\nSilver moon above the hill,\nthe night is soft, the town is still."),
            DemoExample("Write about the river.", "\nThe river runs through field and stone,\nand sings its song to all alone."),
            DemoExample("Write about bread.", "\nWarm bread at the break of day,\nthe baker sends the cold away."),
        ),
    ),
    AdapterRecipe(
        adapter_id="demo/sql",
        r=4,
        lora_alpha=8,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        use_rslora=False,
        seed=13,
        examples=(
            DemoExample("List all customers who live in Paris.", " SELECT * FROM customers WHERE city = 'Paris';"),
            DemoExample("Count the orders from 2023.", " SELECT COUNT(*) FROM orders WHERE year = 2023;"),
            DemoExample("Show the names of products under 10 dollars.", " SELECT name FROM products WHERE price < 10;"),
        ),
    ),
    AdapterRecipe(
        adapter_id="demo/french",
        r=8,
        lora_alpha=32,
        target_modules=("gate_proj", "up_proj", "down_proj"),
        use_rslora=False,
        seed=14,
        examples=(
            DemoExample("Translate to French: Good morning, my friend.", " Bonjour, mon ami."),
            DemoExample("Translate to French: The cat is on the table.", " Le chat est sur la table."),
            DemoExample("Translate to French: I like warm bread.", " J'aime le pain chaud."),
        ),
    ),
)


def recipe_as_dict() -> dict:
    """The whole recipe as plain data (hashed for the cache key, written to the manifest)."""
    return {
        "base": asdict(BASE),
        "base_prompts": list(BASE_PROMPTS),
        "adapters": [asdict(a) for a in ADAPTERS],
    }
