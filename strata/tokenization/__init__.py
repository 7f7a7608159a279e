"""The character/word dual tokenizer and its packaged default vocabulary."""

from pathlib import Path

from strata.tokenization.tokenization_charword import CharWordTokenizer, split_words

DEFAULT_TOKENIZER_PATH = str(Path(__file__).resolve().parent / "default")


def load_default_tokenizer(**kwargs) -> CharWordTokenizer:
    """The tokenizer trained on the bundled corpora (tinyshakespeare, Tang poems, Analects).

    Works offline; keyword arguments go to `from_pretrained` (`add_eos_token=True`, ...).
    """
    return CharWordTokenizer.from_pretrained(DEFAULT_TOKENIZER_PATH, **kwargs)


def register_tokenizer(*config_classes) -> None:
    """Make `AutoTokenizer.from_pretrained(folder)` find CharWordTokenizer without remote code.

    transformers 5.23 resolves the `tokenizer_class` written in tokenizer_config.json through
    a registry filled by `AutoTokenizer.register(config_class, tokenizer_class)`. Every
    config class passed here is registered that way (a strata model folder then loads its
    tokenizer through its config too). With no config class, the name alone is put in that
    registry, which is what a tokenizer-only folder needs.
    """
    from transformers import AutoTokenizer
    from transformers.models.auto import tokenization_auto

    for config_class in config_classes:
        AutoTokenizer.register(config_class, tokenizer_class=CharWordTokenizer, exist_ok=True)
    registry = getattr(tokenization_auto, "REGISTERED_TOKENIZER_CLASSES", None)
    if registry is not None:
        registry[CharWordTokenizer.__name__] = CharWordTokenizer
    elif not config_classes:
        raise RuntimeError(
            "this transformers version has no tokenizer name registry; "
            "call register_tokenizer(SomeConfigClass) to register through a config class"
        )


__all__ = [
    "CharWordTokenizer",
    "DEFAULT_TOKENIZER_PATH",
    "load_default_tokenizer",
    "register_tokenizer",
    "split_words",
]
