"""A byte-level BPE tokenizer trained on the embedded corpus, saved in Hugging Face format.

Byte-level BPE maps every UTF-8 byte to a token, so any text (accents, emoji) encodes and decodes
back exactly with no unknown tokens. Training is deterministic for a fixed corpus and vocab size.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lorafleet.demo.corpus import CORPUS

# Special tokens take the first ids, in this order: unk=0, bos=1, eos=2, pad=3.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# 256 byte symbols + the special tokens must fit; merges fill the rest.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# What renders chat `messages` (contract extension) into the prompt: "role: content" lines after
# BOS, then the assistant's turn opened. Released chat models ship their own in the same place.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tokenizer(vocab_size: int = 512, corpus: str = CORPUS) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` whose vocabulary has exactly `vocab_size` entries
    when the corpus offers enough merges (fewer otherwise; callers read `get_vocab_size()`)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is below the minimum {MIN_VOCAB_SIZE} (256 bytes + specials)")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    for token, want in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID, PAD_ID)):
        got = tok.token_to_id(token)
        if got != want:  # the ids are part of every config we write; never let them drift
            raise RuntimeError(f"special token {token} got id {got}, expected {want}")
    # Like Llama's tokenizers: encoding with special tokens prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tok


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train and save the tokenizer to `out_dir` (tokenizer.json, tokenizer_config.json, the chat
    template) so that `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))


def tokenizer_vocab_size(vocab_size: int) -> int:
    """The real vocabulary size that `build_tokenizer(_, vocab_size)` produces."""
    return train_tokenizer(vocab_size).get_vocab_size()
